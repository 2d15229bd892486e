"""What the mirror (dev/mirror.py) answers, shaped as the Hub answers it so that
`huggingface_hub` parses it unchanged: its errors (which the client raises as typed errors),
byte ranges, and the JSON of model info, repo trees and refs."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from pathlib import PurePosixPath
from typing import Any

from dev.mirror_store import FileMeta, Refs, RevisionMeta, check_repo_id

HF_DATE_FORMAT = "%Y-%m-%dT%H:%M:%S.000Z"


class HubError(Exception):
    """An error answered the way the Hub does, so huggingface_hub raises its typed errors."""

    def __init__(
        self, status: int, code: str | None, message: str, commit: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.commit = commit


def repo_not_found(repo_id: str) -> HubError:
    return HubError(404, "RepoNotFound", f"Repository not found: {repo_id}")


def revision_not_found(revision: str) -> HubError:
    return HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")


def entry_not_found(path: str, commit: str) -> HubError:
    return HubError(404, "EntryNotFound", f"Entry not found: {path}", commit=commit)


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """`bytes=a-b`, `bytes=a-` or `bytes=-n` -> inclusive (start, end); None = whole file.

    Raises ValueError for a syntactically valid but unsatisfiable range (-> 416).
    """
    if not header or not header.startswith("bytes=") or "," in header:
        return None  # no range, or a multi-range we choose not to support: serve the whole file
    first, _, last = header.removeprefix("bytes=").strip().partition("-")
    try:
        if first == "":
            start, end = max(size - int(last), 0), size - 1
        else:
            start = int(first)
            end = min(int(last), size - 1) if last else size - 1
    except ValueError:
        return None
    if start >= size or start > end:
        raise ValueError(header)
    return start, end


def _iso(dt: datetime) -> str:
    return dt.astimezone(UTC).strftime(HF_DATE_FORMAT)


def model_info_json(repo_id: str, rev: RevisionMeta, *, with_blobs: bool) -> dict[str, Any]:
    org, _ = check_repo_id(repo_id)
    siblings: list[dict[str, Any]] = []
    for f in rev.files:
        sibling: dict[str, Any] = {"rfilename": f.path}
        if with_blobs:
            sibling |= {"size": f.size, "blobId": f.blob_id}
            if f.lfs is not None:
                sibling["lfs"] = {
                    "sha256": f.lfs.sha256,
                    "size": f.size,
                    "pointerSize": f.lfs.pointer_size,
                }
        siblings.append(sibling)
    return {
        "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24],
        "id": repo_id,
        "modelId": repo_id,
        "author": org,
        "sha": rev.sha,
        "lastModified": _iso(rev.created_at),
        "createdAt": _iso(rev.created_at),
        "private": False,
        "disabled": False,
        "gated": False,
        "downloads": 0,
        "likes": 0,
        "tags": [],
        "siblings": siblings,
    }


def _file_entry(f: FileMeta) -> dict[str, Any]:
    entry: dict[str, Any] = {"type": "file", "oid": f.blob_id, "size": f.size, "path": f.path}
    if f.lfs is not None:
        entry["lfs"] = {"oid": f.lfs.sha256, "size": f.size, "pointerSize": f.lfs.pointer_size}
    return entry


def _dir_entry(rev: RevisionMeta, path: str) -> dict[str, Any]:
    tree_id = hashlib.sha1(f"{rev.sha}:{path}".encode()).hexdigest()
    return {"type": "directory", "oid": tree_id, "size": 0, "path": path}


def tree_json(rev: RevisionMeta, sub: str, *, recursive: bool) -> list[dict[str, Any]] | None:
    """Entries under directory `sub` ("" = root), or None if there is no such directory."""
    prefix = f"{sub}/" if sub else ""
    files = [f for f in rev.files if f.path.startswith(prefix)]
    if sub and not files:
        return None
    dirs: set[str] = set()
    entries: list[dict[str, Any]] = []
    for f in files:
        parents = PurePosixPath(f.path).parents
        for parent in (p.as_posix() for p in parents):
            if parent != "." and parent.startswith(prefix) and parent != sub:
                dirs.add(parent)
        if recursive or "/" not in f.path.removeprefix(prefix):
            entries.append(_file_entry(f))
    for d in dirs:
        if recursive or "/" not in d.removeprefix(prefix):
            entries.append(_dir_entry(rev, d))
    return sorted(entries, key=lambda e: e["path"])


def refs_json(refs: Refs) -> dict[str, Any]:
    def ref_list(table: dict[str, str], kind: str) -> list[dict[str, str]]:
        return [
            {"name": name, "ref": f"refs/{kind}/{name}", "targetCommit": sha}
            for name, sha in sorted(table.items())
        ]

    return {
        "branches": ref_list(refs.branches, "heads"),
        "tags": ref_list(refs.tags, "tags"),
        "converts": [],
        "pullRequests": [],
    }
