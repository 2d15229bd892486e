"""A local Hugging-Face-compatible mirror, for tests and benchmarks.

It serves a directory of model repos over loopback with exactly the routes that the real
`huggingface_hub` client uses (snapshot_download, hf_hub_download, HfApi.model_info/list_repo_tree/
list_repo_refs), so the production download path runs unchanged against it via `HF_ENDPOINT`.
Fault knobs (throttle, cut, 5xx, corrupt: dev/mirror_faults.py) make failure modes reproducible;
the repos on disk are dev/mirror_store.py, the JSON the Hub answers dev/mirror_api.py.

    with run_mirror(root) as mirror:
        snapshot_download(repo_id, revision=sha, endpoint=mirror.url, local_dir=...)

    python -m dev.mirror --root DIR --port N
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import socket
import threading
import time
from collections.abc import Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType
from typing import Any, BinaryIO
from urllib.parse import parse_qs, unquote, urlsplit

from pydantic import BaseModel

from dev.mirror_api import (
    HubError,
    entry_not_found,
    model_info_json,
    parse_range,
    refs_json,
    repo_not_found,
    revision_not_found,
    tree_json,
)
from dev.mirror_faults import CutFault, ErrorFault, Faults, FaultState
from dev.mirror_store import (
    STREAM_CHUNK,
    MirrorStore,
    RevisionMeta,
)

# Throttled responses send small slices so the pacing is smooth rather than bursty.
THROTTLE_SLICES_PER_S = 20
# snapshot_download opens 8 connections at once; leave headroom for several clients.
LISTEN_BACKLOG = 128
# An idle keep-alive connection is dropped after this long so a crashed client cannot pin a thread.
IDLE_CONNECTION_TIMEOUT_S = 60.0

CONTROL_PREFIX = "/_mirror/"


# --------------------------------------------------------------------------------------------
# HTTP server
# --------------------------------------------------------------------------------------------


class RequestRecord(BaseModel):
    method: str
    path: str
    query: str = ""
    status: int
    range: str | None = None


class _MirrorHTTPServer(ThreadingHTTPServer):
    daemon_threads = False  # stop() joins every handler thread
    block_on_close = True
    request_queue_size = LISTEN_BACKLOG

    def __init__(self, address: tuple[str, int], mirror: MirrorServer) -> None:
        self.mirror = mirror
        self.open_sockets: set[socket.socket] = set()
        self.sockets_lock = threading.Lock()
        super().__init__(address, _Handler)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the client's connection pool expects
    timeout = IDLE_CONNECTION_TIMEOUT_S
    server: _MirrorHTTPServer
    # Set per request by _handle; empty while the request line is still unparsed.
    _decoded_path = ""
    _query = ""

    # -- plumbing ---------------------------------------------------------------------------

    def setup(self) -> None:
        super().setup()
        with self.server.sockets_lock:
            self.server.open_sockets.add(self.connection)

    def finish(self) -> None:
        with contextlib.suppress(OSError):
            super().finish()
        with self.server.sockets_lock:
            self.server.open_sockets.discard(self.connection)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the structured request log replaces stderr noise

    def send_response(self, code: int, message: str | None = None) -> None:
        # Logged before the client can see any byte of the answer, so a test that has its
        # response never races the log.
        if self._decoded_path and not self._decoded_path.startswith(CONTROL_PREFIX):
            self.mirror._record(
                RequestRecord(
                    method=self.command,
                    path=self._decoded_path,
                    query=self._query,
                    status=code,
                    range=self.headers.get("Range"),
                )
            )
        super().send_response(code, message)

    def do_GET(self) -> None:
        self._handle()

    def do_HEAD(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def do_DELETE(self) -> None:
        self._handle()

    @property
    def mirror(self) -> MirrorServer:
        return self.server.mirror

    def _handle(self) -> None:
        split = urlsplit(self.path)
        raw_segments = [s for s in split.path.split("/") if s]
        decoded_path = unquote(split.path)
        self._decoded_path = decoded_path  # what fault globs match against
        self._query = split.query
        if decoded_path.startswith(CONTROL_PREFIX):
            self._control(decoded_path)
            return
        try:
            self._route(decoded_path, raw_segments, parse_qs(split.query))
        except HubError as e:
            self._send_hub_error(e)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client went away mid-body

    def _send_json(self, status: int, body: Any, headers: Mapping[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _send_hub_error(self, e: HubError) -> None:
        headers = {"X-Error-Message": e.message}
        if e.code:
            headers["X-Error-Code"] = e.code
        if e.commit:
            headers["X-Repo-Commit"] = e.commit
        self._send_json(e.status, {"error": e.message}, headers)

    # -- control routes ---------------------------------------------------------------------

    def _control(self, path: str) -> None:
        route = (self.command, path.rstrip("/"))
        if route == ("GET", "/_mirror/requests"):
            self._send_json(200, [r.model_dump() for r in self.mirror.requests])
        elif route == ("POST", "/_mirror/requests/clear"):
            self.mirror.clear_requests()
            self._send_json(200, {"ok": True})
        elif route == ("GET", "/_mirror/faults"):
            self._send_json(200, self.mirror.faults.model_dump())
        elif route == ("POST", "/_mirror/faults"):
            length = int(self.headers.get("Content-Length") or 0)
            try:
                faults = Faults.model_validate_json(self.rfile.read(length) or b"{}")
            except ValueError as e:
                self._send_json(422, {"error": str(e)})
                return
            self.mirror.set_faults(faults)
            self._send_json(200, faults.model_dump())
        elif route == ("DELETE", "/_mirror/faults"):
            self.mirror.clear_faults()
            self._send_json(200, {"ok": True})
        else:
            self._send_json(404, {"error": f"no control route {self.command} {path}"})

    # -- hub routes -------------------------------------------------------------------------

    def _route(self, path: str, segs: list[str], query: dict[str, list[str]]) -> None:
        error = self.mirror.fault_state.take("error", self.command, path)
        if isinstance(error, ErrorFault):
            raise HubError(error.status, None, f"injected fault: HTTP {error.status}")
        if self.command not in ("GET", "HEAD"):
            self.close_connection = True  # an unread request body would desync keep-alive
            raise HubError(405, None, f"method {self.command} not allowed")

        if len(segs) >= 4 and segs[:2] == ["api", "models"]:
            repo_id = f"{unquote(segs[2])}/{unquote(segs[3])}"
            rest = segs[4:]
            if not rest:
                return self._model_info(repo_id, "main", query)
            if rest[0] == "revision" and len(rest) == 2:
                return self._model_info(repo_id, unquote(rest[1]), query)
            if rest[0] == "tree" and len(rest) >= 2:
                sub = "/".join(unquote(s) for s in rest[2:])
                return self._tree(repo_id, unquote(rest[1]), sub, query)
            if rest == ["refs"]:
                return self._refs(repo_id)
        if len(segs) >= 5 and segs[2] == "resolve":
            repo_id = f"{unquote(segs[0])}/{unquote(segs[1])}"
            return self._resolve(repo_id, unquote(segs[3]), "/".join(unquote(s) for s in segs[4:]))
        raise HubError(404, None, f"no route for {path}")

    def _revision(self, repo_id: str, revision: str) -> RevisionMeta:
        store = self.mirror.store
        if not store.has_repo(repo_id):
            raise repo_not_found(repo_id)
        sha = store.resolve(repo_id, revision)
        if sha is None:
            raise revision_not_found(revision)
        return store.revision(repo_id, sha)

    def _model_info(self, repo_id: str, revision: str, query: dict[str, list[str]]) -> None:
        rev = self._revision(repo_id, revision)
        with_blobs = query.get("blobs", [""])[0].lower() in ("true", "1")
        info = model_info_json(repo_id, rev, with_blobs=with_blobs)
        expand = query.get("expand", []) + query.get("expand[]", [])
        if expand:
            # Like the Hub: an expanded request returns only the asked properties plus the ids.
            info = {k: v for k, v in info.items() if k in ("_id", "id", *expand)}
        self._send_json(200, info)

    def _tree(self, repo_id: str, revision: str, sub: str, query: dict[str, list[str]]) -> None:
        rev = self._revision(repo_id, revision)
        recursive = query.get("recursive", [""])[0].lower() in ("true", "1")
        entries = tree_json(rev, sub.strip("/"), recursive=recursive)
        if entries is None:
            raise entry_not_found(sub, rev.sha)
        self._send_json(200, entries)

    def _refs(self, repo_id: str) -> None:
        if not self.mirror.store.has_repo(repo_id):
            raise repo_not_found(repo_id)
        self._send_json(200, refs_json(self.mirror.store.refs(repo_id)))

    def _resolve(self, repo_id: str, revision: str, path: str) -> None:
        rev = self._revision(repo_id, revision)
        meta = rev.file(path)
        if meta is None:
            raise entry_not_found(path, rev.sha)
        try:
            span = parse_range(self.headers.get("Range"), meta.size)
        except ValueError:
            self._send_json(
                416,
                {"error": "range not satisfiable"},
                {
                    "Content-Range": f"bytes */{meta.size}",
                    "X-Repo-Commit": rev.sha,
                },
            )
            return
        start, end = span if span is not None else (0, meta.size - 1)
        length = end - start + 1 if meta.size else 0

        self.send_response(206 if span is not None else 200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(length))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", f'"{meta.etag}"')
        self.send_header("X-Repo-Commit", rev.sha)
        if meta.lfs is not None:
            self.send_header("X-Linked-Etag", f'"{meta.lfs.sha256}"')
            self.send_header("X-Linked-Size", str(meta.size))
        if span is not None:
            self.send_header("Content-Range", f"bytes {start}-{end}/{meta.size}")
        self.end_headers()
        if self.command == "GET" and length:
            with self.mirror.store.file_path(repo_id, rev.sha, path).open("rb") as f:
                self._stream(f, start, length)

    def _stream(self, f: BinaryIO, start: int, length: int) -> None:
        faults = self.mirror.fault_state
        throttle = faults.current.throttle_bytes_per_s
        cut = faults.take("cut", self.command, self._decoded_path)
        corrupt = faults.take("corrupt", self.command, self._decoded_path) is not None
        if throttle is None and cut is None and not corrupt:
            self.connection.sendfile(f, start, length)  # zero-copy fast path
            return
        limit = length if not isinstance(cut, CutFault) else min(length, cut.after_bytes)
        chunk_size = STREAM_CHUNK
        if throttle is not None:
            chunk_size = max(1, min(STREAM_CHUNK, throttle // THROTTLE_SLICES_PER_S))
        f.seek(start)
        sent = 0
        began = time.monotonic()
        while sent < limit:
            chunk = f.read(min(chunk_size, limit - sent))
            if not chunk:
                break
            if corrupt:
                chunk = bytes([chunk[0] ^ 0xFF]) + chunk[1:]  # same length, different bytes
            self.wfile.write(chunk)
            sent += len(chunk)
            if throttle is not None:
                ahead = sent / throttle - (time.monotonic() - began)
                if ahead > 0:
                    time.sleep(ahead)
        if sent < length:
            # Promised Content-Length not delivered: the client must see a truncated body.
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)


class MirrorServer:
    """The mirror on a loopback port; `start()`/`stop()` or use as a context manager."""

    def __init__(self, root: Path | MirrorStore, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.store = root if isinstance(root, MirrorStore) else MirrorStore(root)
        self.fault_state = FaultState()
        self._log: list[RequestRecord] = []
        self._log_lock = threading.Lock()
        self._httpd = _MirrorHTTPServer((host, port), self)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        return f"http://{self._httpd.server_address[0]}:{self.port}"

    # -- request log ------------------------------------------------------------------------

    def _record(self, record: RequestRecord) -> None:
        with self._log_lock:
            self._log.append(record)

    @property
    def requests(self) -> list[RequestRecord]:
        with self._log_lock:
            return list(self._log)

    def clear_requests(self) -> None:
        with self._log_lock:
            self._log.clear()

    # -- faults -----------------------------------------------------------------------------

    @property
    def faults(self) -> Faults:
        return self.fault_state.current

    def set_faults(self, faults: Faults | None = None, **knobs: Any) -> Faults:
        """Replace the active faults, e.g. `set_faults(cut=CutFault(after_bytes=10, times=1))`."""
        faults = faults if faults is not None else Faults.model_validate(knobs)
        self.fault_state.set(faults)
        return faults

    def clear_faults(self) -> None:
        self.fault_state.set(Faults())

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> MirrorServer:
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name=f"mirror:{self.port}", daemon=True
        )
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        try:
            self._httpd.serve_forever()
        finally:
            self._close()

    def stop(self) -> None:
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
            self._thread = None
        self._close()

    def _close(self) -> None:
        # Keep-alive handler threads block reading the next request: wake them so close() can join.
        with self._httpd.sockets_lock:
            for sock in list(self._httpd.open_sockets):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        self._httpd.server_close()

    def __enter__(self) -> MirrorServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def run_mirror(
    root: Path | MirrorStore, *, host: str = "127.0.0.1", port: int = 0
) -> Iterator[MirrorServer]:
    """A mirror serving `root` in a background thread for the duration of the block."""
    with MirrorServer(root, host=host, port=port) as mirror:
        yield mirror


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    mirror = MirrorServer(args.root, host=args.host, port=args.port)

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    print(json.dumps({"url": mirror.url, "root": str(args.root)}), flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        mirror.serve_forever()


if __name__ == "__main__":
    main()
