"""The mirror's repos on disk: revisions with the sizes and hashes the Hub reports (LFS sha256,
git blob sha1), refs, and the commit ids they get."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath

from pydantic import BaseModel, Field

from serving.core.files import write_atomically

KiB = 1024


MiB = 1024 * KiB
# Large enough that a 1 GiB pull is not dominated by per-chunk overhead.
STREAM_CHUNK = 1 * MiB


# HF stores files of 1 MiB or more, and weight formats of any size, in LFS; the client then
# expects the sha256 as ETag and the LFS metadata in listings.
LFS_MIN_SIZE = 1 * MiB


LFS_SUFFIXES = (".safetensors", ".bin", ".gguf")


COMMIT_SHA_RE = re.compile(r"^[0-9a-f]{40}$")


NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


LFS_SPEC = "https://git-lfs.github.com/spec/v1"


FileSource = Path | bytes


class LfsMeta(BaseModel):
    sha256: str
    pointer_size: int
    # Git stores the pointer text, not the content: HF reports the pointer's blob id as `oid`.
    pointer_blob_id: str


class FileMeta(BaseModel):
    path: str
    size: int
    git_sha1: str  # git blob sha1 of the content itself
    lfs: LfsMeta | None = None

    @property
    def blob_id(self) -> str:
        return self.lfs.pointer_blob_id if self.lfs else self.git_sha1

    @property
    def etag(self) -> str:
        return self.lfs.sha256 if self.lfs else self.git_sha1


class RevisionMeta(BaseModel):
    sha: str
    parent: str | None
    created_at: datetime
    files: list[FileMeta]

    def file(self, path: str) -> FileMeta | None:
        return next((f for f in self.files if f.path == path), None)


class Refs(BaseModel):
    branches: dict[str, str] = Field(default_factory=dict)
    tags: dict[str, str] = Field(default_factory=dict)


def git_blob_sha1_header(size: int) -> bytes:
    return b"blob %d\0" % size


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version {LFS_SPEC}\noid sha256:{sha256}\nsize {size}\n".encode()


def is_lfs(path: str, size: int) -> bool:
    return size >= LFS_MIN_SIZE or path.endswith(LFS_SUFFIXES)


def hash_file(path: Path, repo_path: str) -> FileMeta:
    """One pass over the file computes both the git sha1 and (for LFS files) the sha256."""
    size = path.stat().st_size
    git = hashlib.sha1(git_blob_sha1_header(size))
    sha256 = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(STREAM_CHUNK):
            git.update(chunk)
            sha256.update(chunk)
    lfs = None
    if is_lfs(repo_path, size):
        pointer = lfs_pointer(sha256.hexdigest(), size)
        lfs = LfsMeta(
            sha256=sha256.hexdigest(),
            pointer_size=len(pointer),
            pointer_blob_id=hashlib.sha1(git_blob_sha1_header(len(pointer)) + pointer).hexdigest(),
        )
    return FileMeta(path=repo_path, size=size, git_sha1=git.hexdigest(), lfs=lfs)


def commit_sha(parent: str | None, files: Iterable[FileMeta]) -> str:
    h = hashlib.sha1(f"parent {parent or ''}\n".encode())
    for f in sorted(files, key=lambda f: f.path):
        h.update(f"{f.path}\0{f.size}\0{f.git_sha1}\n".encode())
    return h.hexdigest()


def check_repo_id(repo_id: str) -> tuple[str, str]:
    parts = repo_id.split("/")
    if len(parts) != 2 or not all(NAME_RE.match(p) for p in parts):
        raise ValueError(f"repo_id must be 'org/name', got {repo_id!r}")
    return parts[0], parts[1]


def check_repo_path(path: str) -> str:
    pure = PurePosixPath(path)
    if pure.is_absolute() or not pure.parts or any(p in ("", ".", "..") for p in pure.parts):
        raise ValueError(f"invalid file path in repo: {path!r}")
    return pure.as_posix()


def _place_file(source: FileSource, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(source, bytes):
        dest.write_bytes(source)
        return
    try:
        os.link(source, dest)  # revisions share weights without copying gigabytes
    except OSError:
        shutil.copyfile(source, dest)


class MirrorStore:
    """Repos on disk: `<root>/<org>/<name>/{refs.json, revisions/<sha>/..., revisions/<sha>.json}`.

    The per-revision metadata (sizes, hashes) lives next to, not inside, the revision directory, so
    it is never served as a repo file, and it is computed once at `add_revision` time.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._revision_cache: dict[tuple[str, str], RevisionMeta] = {}

    def repo_dir(self, repo_id: str) -> Path:
        org, name = check_repo_id(repo_id)
        return self.root / org / name

    def has_repo(self, repo_id: str) -> bool:
        try:
            return (self.repo_dir(repo_id) / "refs.json").is_file()
        except ValueError:
            return False

    def refs(self, repo_id: str) -> Refs:
        path = self.repo_dir(repo_id) / "refs.json"
        return Refs.model_validate_json(path.read_text()) if path.is_file() else Refs()

    def resolve(self, repo_id: str, revision: str) -> str | None:
        """Branch, tag or full commit sha -> commit sha, or None if unknown."""
        refs = self.refs(repo_id)
        for table, prefix in ((refs.branches, "refs/heads/"), (refs.tags, "refs/tags/")):
            name = revision.removeprefix(prefix)
            if name in table:
                return table[name]
        if COMMIT_SHA_RE.match(revision) and self._meta_path(repo_id, revision).is_file():
            return revision
        return None

    def revision(self, repo_id: str, sha: str) -> RevisionMeta:
        key = (repo_id, sha)
        with self._lock:
            cached = self._revision_cache.get(key)
        if cached is not None:
            return cached
        meta = RevisionMeta.model_validate_json(self._meta_path(repo_id, sha).read_text())
        with self._lock:
            self._revision_cache[key] = meta
        return meta

    def file_path(self, repo_id: str, sha: str, path: str) -> Path:
        return self.repo_dir(repo_id) / "revisions" / sha / check_repo_path(path)

    def add_revision(
        self,
        repo_id: str,
        files: Mapping[str, FileSource],
        *,
        branch: str = "main",
        tags: Iterable[str] = (),
    ) -> str:
        """Create a revision on top of `branch`, move the branch to it, tag it; return its sha."""
        repo = self.repo_dir(repo_id)
        revisions = repo / "revisions"
        revisions.mkdir(parents=True, exist_ok=True)
        with self._lock:
            parent = self.refs(repo_id).branches.get(branch)
            staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=revisions))
            try:
                metas = []
                for raw_path, source in sorted(files.items()):
                    repo_path = check_repo_path(raw_path)
                    _place_file(source, staging / repo_path)
                    metas.append(hash_file(staging / repo_path, repo_path))
                sha = commit_sha(parent, metas)
                final = revisions / sha
                if final.exists():
                    shutil.rmtree(staging)
                else:
                    staging.rename(final)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            meta = RevisionMeta(sha=sha, parent=parent, created_at=datetime.now(UTC), files=metas)
            if not self._meta_path(repo_id, sha).is_file():
                write_atomically(self._meta_path(repo_id, sha), meta.model_dump_json(indent=1))
            refs = self.refs(repo_id)
            refs.branches[branch] = sha
            for tag in tags:
                refs.tags[tag] = sha
            write_atomically(repo / "refs.json", refs.model_dump_json(indent=1))
        return sha

    def _meta_path(self, repo_id: str, sha: str) -> Path:
        return self.repo_dir(repo_id) / "revisions" / f"{sha}.json"
