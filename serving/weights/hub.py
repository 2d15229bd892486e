"""Talking to the hub: the token, revisions, file lists, single files, and the retry rule.

huggingface_hub retries API calls itself but fails a file GET on the first 5xx, so every network
step here runs inside `Retry`: transient failures (5xx, cut connections) are retried with backoff,
everything else fails at once with one line for a person. The HF token is passed to
huggingface_hub only; it never reaches a log line or an exception.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple, TypeVar

import httpx
from huggingface_hub import HfApi, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import filter_repo_objects

from serving.config.profile import check_revision, is_commit_sha
from serving.weights.models import FileEntry, GiB, HubUnavailable, WeightsError

log = logging.getLogger(__name__)

T = TypeVar("T")

HF_TOKEN_ENV = "HF_TOKEN"
HIGH_PERFORMANCE_ENV = "HF_XET_HIGH_PERFORMANCE"
# snapshot_download's own default; more connections do not help a single origin.
DOWNLOAD_WORKERS = 8
# Whole-step attempts on a transient failure (5xx, cut connection).
DOWNLOAD_ATTEMPTS = 4
BACKOFF_FIRST_S = 2.0
BACKOFF_MAX_S = 60.0
# What an engine needs to build a model without its weights: trust_remote_code configs name
# Python files of the repo.
MODEL_CONFIG_PATTERNS = ["config.json", "*.py"]
# What an engine needs to serve random weights of a model: its config, tokenizer and chat
# template, no weights.
SERVING_CONFIG_PATTERNS = [
    *MODEL_CONFIG_PATTERNS, "generation_config.json", "tokenizer*", "special_tokens_map.json",
    "vocab*", "merges.txt", "chat_template*", "*.tiktoken", "tokenizer.model",
]  # fmt: skip


def hf_token() -> str | None:
    """The Hub token: HF_TOKEN, which the profile's Modal Secret (`secrets.hf_token`) holds in
    a container and the orchestrator's environment holds outside. Passed on, never logged."""
    return os.environ.get(HF_TOKEN_ENV) or None


def ask_high_performance() -> None:
    """hf_xet reads it when its runtime starts: call before the first transfer of the process."""
    os.environ[HIGH_PERFORMANCE_ENV] = "1"


def require_commit(revision: str) -> None:
    if not is_commit_sha(revision):
        raise WeightsError(f"revision {revision!r} must be resolved to a 40-hex commit first")


def make_dir(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WeightsError(f"cannot create {directory}: {exc.strerror}") from None


# --------------------------------------------------------------------------------------------
# Revisions and file lists
# --------------------------------------------------------------------------------------------


def resolve_revision(
    repo: str, revision: str, token: str | None = None, *, endpoint: str | None = None
) -> str:
    """A 40-hex commit as is (no request); a branch or tag -> its commit, with the cheapest call."""
    if is_commit_sha(revision):
        return revision
    try:
        check_revision(revision)
    except ValueError as exc:
        raise WeightsError(str(exc)) from None
    try:
        info = HfApi(endpoint=endpoint, token=token).model_info(
            repo, revision=revision, expand=["sha"]
        )
    except Exception as exc:
        failure = HubUnavailable if _is_transient(exc) else WeightsError
        raise failure(_describe(exc, repo, revision, token)) from None
    if not info.sha or not is_commit_sha(info.sha):
        raise WeightsError(f"{repo}@{revision}: the hub returned no commit sha")
    return info.sha


def fetch_files(
    repo: str, revision: str, token: str | None = None, *, endpoint: str | None = None
) -> list[FileEntry]:
    """Every file of the commit with size and hash: one API call."""
    info = HfApi(endpoint=endpoint, token=token).model_info(
        repo, revision=revision, files_metadata=True
    )
    entries = []
    for sibling in info.siblings or []:
        if sibling.size is None:
            raise WeightsError(
                f"{repo}@{revision}: the hub returned no size for {sibling.rfilename}"
            )
        entries.append(
            FileEntry(
                path=sibling.rfilename,
                size=sibling.size,
                lfs=sibling.lfs is not None,
                sha256=sibling.lfs.sha256 if sibling.lfs is not None else None,
                blob_id=sibling.blob_id,
            )
        )
    return entries


def select_files(
    files: Sequence[FileEntry],
    allow_patterns: Sequence[str] | None = None,
    ignore_patterns: Sequence[str] | None = None,
) -> list[FileEntry]:
    """The profile's selection, with huggingface_hub's own pattern semantics."""
    return list(
        filter_repo_objects(
            files,
            allow_patterns=list(allow_patterns) if allow_patterns is not None else None,
            ignore_patterns=list(ignore_patterns) if ignore_patterns is not None else None,
            key=lambda entry: entry.path,
        )
    )


class RevisionFiles(NamedTuple):
    every: list[FileEntry]  # the whole revision: what is not in it is "extra" on disk
    selected: list[FileEntry]  # what the profile downloads


def revision_files(
    repo: str,
    revision: str,
    allow_patterns: Sequence[str] | None,
    ignore_patterns: Sequence[str] | None,
    *,
    token: str | None = None,
    endpoint: str | None = None,
    known: Sequence[FileEntry] | None = None,
    retry: Retry | None = None,
) -> RevisionFiles:
    """The revision's files (`known`, or fetched with retries) and the profile's selection of
    them, which must not be empty."""
    if known is not None:
        every = list(known)
    else:
        retry = retry or Retry(repo, revision, token)
        every = retry.run(
            "file metadata", lambda: fetch_files(repo, revision, token, endpoint=endpoint)
        )
    selected = select_files(every, allow_patterns, ignore_patterns)
    if not selected:
        raise WeightsError(f"{repo}@{revision[:8]}: no file matches the allow/ignore patterns")
    return RevisionFiles(every, selected)


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def fetch_model_config(
    repo: str,
    revision: str,
    directory: Path,
    *,
    token: str | None = None,
    endpoint: str | None = None,
    patterns: Sequence[str] = tuple(MODEL_CONFIG_PATTERNS),
) -> Path:
    """The model's config.json (and any remote code it names) alone, into its own directory
    (or, given `patterns`, what else they name: SERVING_CONFIG_PATTERNS for dummy weights).

    The DeepGEMM compile runs on these with dummy weights, so it can start while the shards
    are still downloading; a separate directory keeps it clear of the download's bookkeeping.
    """
    directory = Path(directory)
    require_commit(revision)
    if (directory / "config.json").is_file():
        return directory
    make_dir(directory)
    Retry(repo, revision, token).run(
        "config.json",
        lambda: snapshot_download(
            repo,
            revision=revision,
            local_dir=directory,
            allow_patterns=list(patterns),
            token=token,
            endpoint=endpoint,
        ),
        directory,
    )
    return directory


# --------------------------------------------------------------------------------------------
# Retries and one-line errors
# --------------------------------------------------------------------------------------------


class Retry:
    """Runs a network step; transient failures are retried with backoff, the rest fail at once
    with one line. `attempts_used` counts every try of every step run through it."""

    def __init__(
        self,
        repo: str,
        revision: str,
        token: str | None,
        attempts: int = DOWNLOAD_ATTEMPTS,
        backoff_s: float = BACKOFF_FIRST_S,
    ) -> None:
        self.repo = repo
        self.revision = revision
        self.token = token
        self.attempts = max(1, attempts)
        self.backoff_s = backoff_s
        self.attempts_used = 0

    def run(self, what: str, step: Callable[[], T], directory: Path | None = None) -> T:
        delay = self.backoff_s
        for attempt in range(1, self.attempts + 1):
            self.attempts_used += 1
            try:
                return step()
            except WeightsError:
                raise
            except Exception as exc:
                if directory is not None and is_disk_full(exc):
                    raise WeightsError(
                        disk_full_line(directory, self.repo, self.revision)
                    ) from None
                line = _describe(exc, self.repo, self.revision, self.token)
                if not _is_transient(exc):
                    raise WeightsError(line) from None
                if attempt == self.attempts:
                    raise WeightsError(
                        f"{what} failed after {attempt} attempt(s): {line}"
                    ) from None
                log.warning("%s attempt %d/%d failed (%s); retrying in %.0fs",
                            what, attempt, self.attempts, line, delay)  # fmt: skip
                time.sleep(delay)
                delay = min(BACKOFF_MAX_S, delay * 2)
        raise AssertionError("unreachable")


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def is_disk_full(exc: BaseException) -> bool:
    return any(
        isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT) for e in _chain(exc)
    )


def disk_full_line(directory: Path, repo: str, revision: str) -> str:
    try:
        free = f"{shutil.disk_usage(directory).free / GiB:.2f} GiB free"
    except OSError:
        free = "free space unknown"
    return f"disk full writing {repo}@{revision[:8]} to {directory} ({free}); no sentinel written"


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def _is_transient(exc: BaseException) -> bool:
    for e in _chain(exc):
        if isinstance(e, (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError)):
            return False
        status = _status(e)
        if status is not None:
            return status >= 500 or status in (408, 429)
        if isinstance(e, (httpx.TransportError, LocalEntryNotFoundError)):
            return True
        # huggingface_hub's own HTTP stack (a fork of httpx) has the same error names.
        if type(e).__name__ in _TRANSIENT_NAMES:
            return True
        if isinstance(e, OSError) and "Consistency check failed" in str(e):
            return True  # a body shorter than Content-Length: the connection was cut
    return False


_TRANSIENT_NAMES = frozenset({
    "ConnectError", "ConnectTimeout", "ReadTimeout", "WriteTimeout", "PoolTimeout",
    "ReadError", "WriteError", "RemoteProtocolError", "NetworkError", "TimeoutException",
    "ProtocolError", "ConnectionError", "IncompleteSnapshotError",
})  # fmt: skip


def _describe(exc: BaseException, repo: str, revision: str, token: str | None) -> str:
    """One line for a person: what was not found or what failed, never the token."""
    if isinstance(exc, GatedRepoError):
        line = f"{repo} is gated: accept its terms on the hub with the account of the token"
    elif isinstance(exc, RepositoryNotFoundError):
        line = f"repo {repo} not found (or private, and the token has no access)"
    elif isinstance(exc, RevisionNotFoundError):
        line = f"revision {revision!r} not found in {repo}"
    elif isinstance(exc, EntryNotFoundError):
        line = f"{repo}@{revision[:8]}: file not found ({_first_line(exc)})"
    elif _status(exc) in (401, 403):
        line = f"{repo}: access denied (HTTP {_status(exc)}): check the HF token"
    elif _status(exc) is not None:
        line = f"HTTP {_status(exc)} from the hub: {_first_line(exc)}"
    else:
        line = f"{type(exc).__name__}: {_first_line(exc)}"
    if token:
        line = line.replace(token, "***")
    return line


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
