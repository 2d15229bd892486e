"""The data of serving.weights: what the hub says a file is, the sentinel's manifest, and the
reports a download or a verification hands back. Also the names of huggingface_hub's own
bookkeeping inside a revision directory, which every step has to step around.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from serving.core.errors import ExpectedFailure

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

MANIFEST_FORMAT = 1

# Where huggingface_hub keeps per-file metadata, partial files and the tree listing of a
# `local_dir` download; never part of the revision.
HF_LOCAL_CACHE = ".cache"
HF_DOWNLOAD_DIR = Path(".cache") / "huggingface" / "download"
INCOMPLETE_SUFFIX = ".incomplete"


class WeightsError(ExpectedFailure):
    """A download or verification that cannot succeed; the message is one line, without secrets."""


class HubUnavailable(WeightsError):
    """The hub did not answer (a cut connection, a 5xx, a timeout): the same call may succeed
    later, unlike a revision that is not there."""


class FileEntry(BaseModel):
    """One file of a revision as the hub describes it."""

    path: str
    size: int = Field(ge=0)
    lfs: bool
    sha256: str | None = Field(None, description="content sha256, for LFS files")
    blob_id: str | None = Field(None, description="git blob sha1 (of the pointer, for LFS files)")

    @property
    def digest(self) -> tuple[Literal["sha256", "git-sha1"], str]:
        if self.lfs:
            if not self.sha256:
                raise WeightsError(f"hub metadata of LFS file {self.path} has no sha256")
            return "sha256", self.sha256
        if not self.blob_id:
            raise WeightsError(f"hub metadata of {self.path} has no blob id")
        return "git-sha1", self.blob_id

    @property
    def etag(self) -> str:
        """What huggingface_hub puts in the name of this file's partial download."""
        return self.digest[1]


class Stamp(BaseModel):
    """A file as the filesystem describes it, taken when its bytes were proven to be the hub's.

    Evidence that lasts: any write changes the ctime, which no one can set back (unlike the
    mtime), and a file replaced by another has another inode. A file whose stamp still equals
    this one holds the bytes that were hashed; any other is read again.
    """

    size: int
    mtime_ns: int
    ctime_ns: int
    inode: int


class Manifest(BaseModel):
    """The sentinel: written last, atomically, only after every file verified in the same run."""

    format: int = MANIFEST_FORMAT
    repo: str
    revision: str
    allow_patterns: list[str] | None = None
    ignore_patterns: list[str] | None = None
    files: list[FileEntry]
    bytes_total: int
    extra: list[str] = Field(default_factory=list, description="present but not in the revision")
    started_at: datetime
    finished_at: datetime
    stamps: dict[str, Stamp] = Field(
        default_factory=dict,
        description="each file as it was when its hash matched (absent in sentinels written "
        "before hashing in flight: their files are read again)",
    )


class VerifyReport(BaseModel):
    ok: list[str] = Field(default_factory=list)
    bad: list[str] = Field(default_factory=list)
    missing: list[str] = Field(default_factory=list)
    extra: list[str] = Field(default_factory=list)
    bytes_hashed: int = Field(0, description="bytes read from disk to hash them")
    bytes_trusted: int = Field(
        0, description="bytes proven by a stamp unchanged since they were hashed, not read"
    )
    seconds: float = 0.0
    # The evidence of this proof, for the next sentinel; stays in the process that proved it.
    stamps: dict[str, Stamp] = Field(default_factory=dict, exclude=True)

    @property
    def passed(self) -> bool:
        return not self.bad and not self.missing

    @property
    def broken(self) -> list[str]:
        """What a repair has to fetch again."""
        return self.bad + self.missing

    def summary(self) -> str:
        parts = [f"{len(self.ok)} ok"]
        for name, paths in (("bad", self.bad), ("missing", self.missing), ("extra", self.extra)):
            if paths:
                shown = ", ".join(paths[:3]) + (
                    f", +{len(paths) - 3} more" if len(paths) > 3 else ""
                )
                parts.append(f"{len(paths)} {name} ({shown})")
        return "; ".join(parts)


class Progress(BaseModel):
    phase: Literal["download", "verify"]
    bytes_done: int
    bytes_total: int
    rate_bytes_per_s: float
    eta_s: float | None

    def line(self) -> str:
        eta = f"{self.eta_s:.0f}s" if self.eta_s is not None else "?"
        return (
            f"{self.phase} {self.bytes_done / GiB:.2f}/{self.bytes_total / GiB:.2f} GiB "
            f"{self.rate_bytes_per_s / MiB:.0f} MiB/s eta {eta}"
        )


ProgressCallback = Callable[[Progress], None]

PROOF_BYTES_READ_MEANING = (
    "bytes the proof after the download read from disk: files this run did not hash as they "
    "arrived (finished by an earlier run, or failing their hash); 0 for a fresh download"
)
BYTES_DOWNLOADED_MEANING = (
    "bytes of the files this run wrote (a file fetched twice within the run counts once); "
    "0 when a sentinel answered"
)


class ShardResult(BaseModel):
    """What one container of a sharded download proves: these files, verified in this run."""

    repo: str
    revision: str
    files: list[FileEntry]
    started_at: datetime
    finished_at: datetime
    refetched: list[str] = Field(default_factory=list)
    bytes_downloaded: int = Field(0, description=BYTES_DOWNLOADED_MEANING)
    proof_bytes_read: int = Field(0, description=PROOF_BYTES_READ_MEANING)
    stamps: dict[str, Stamp] = Field(default_factory=dict)


class DownloadResult(BaseModel):
    directory: Path
    manifest: Manifest
    cached: bool = Field(description="a valid sentinel was found; nothing was downloaded")
    refetched: list[str] = Field(default_factory=list)
    attempts: int = 0
    seconds: float = 0.0
    bytes_downloaded: int = Field(0, description=BYTES_DOWNLOADED_MEANING)
    proof_bytes_read: int = Field(0, description=PROOF_BYTES_READ_MEANING)
