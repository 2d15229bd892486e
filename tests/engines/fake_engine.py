"""FAKE inference engine for supervisor tests -- not a model, not SGLang, not transformers.

It exists only to produce, on demand, what a real engine cannot: canned answers (well-formed and
malformed tool calls, reasoning-only answers), a /health that stays 503, slow streams that must
survive a graceful stop, a process that ignores SIGTERM (with a child that does too), and a
record of every request it received (snapshot endpoints, headers, bodies).

The answer is chosen by the last message's content: "canned:<name>" picks CANNED[<name>],
anything else gets DEFAULT_ANSWER. Stdlib only, so it starts in a fraction of a second.

    python tests/engines/fake_engine.py --port N [--record FILE] [--health-delay S]
        [--stream-chunks K --stream-interval S] [--ignore-sigterm --child-pid-file FILE]
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

DEFAULT_ANSWER: dict[str, Any] = {"content": "A fake answer."}


def _tool_call(name: str, arguments: str) -> dict[str, Any]:
    return {
        "content": None,
        "tool_calls": [
            {"id": "call_0", "type": "function", "function": {"name": name, "arguments": arguments}}
        ],
    }


CANNED: dict[str, dict[str, Any]] = {
    "content": {"content": "Hello from the fake."},
    "empty": {"content": ""},
    "reasoning_only": {"content": "", "reasoning_content": "Let me think about it."},
    "reasoning_and_content": {"content": "Paris.", "reasoning_content": "The capital is Paris."},
    "tool_ok": _tool_call("get_weather", '{"city": "Paris"}'),
    "tool_bad_json": _tool_call("get_weather", '{city: "Paris"'),
    "tool_not_object": _tool_call("get_weather", '["Paris"]'),
    "tool_wrong_name": _tool_call("get_time", '{"city": "Paris"}'),
}
# Canned HTTP failures: (status, body).
CANNED_ERRORS: dict[str, tuple[int, str]] = {"error": (500, '{"detail": "fake internal error"}')}
# A sub-process that outlives a SIGTERM like an engine worker might (bounded, in case of leaks).
STUBBORN_CHILD = (
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)"
)


class FakeState:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.started = time.monotonic()
        self.draining = False
        self.record_lock = threading.Lock()

    def record(self, entry: dict[str, Any]) -> None:
        if self.args.record is None:
            return
        with self.record_lock, self.args.record.open("a") as out:
            out.write(json.dumps(entry) + "\n")


class Handler(BaseHTTPRequestHandler):
    # HTTP/1.0: one request per connection, so a graceful stop never waits on idle keep-alives.
    protocol_version = "HTTP/1.0"
    state: FakeState

    def log_message(self, format: str, *args: Any) -> None:
        print(f"fake: {self.command} {self.path} {args[1] if len(args) > 1 else ''}", flush=True)

    def do_GET(self) -> None:
        if self.path == "/health":
            warming = time.monotonic() - self.state.started < self.state.args.health_delay
            healthy = not warming and not self.state.draining
            self._json(200 if healthy else 503, {"status": "ok" if healthy else "unavailable"})
        else:
            self._json(404, {"detail": "not found"})

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length) or b"{}")
        self.state.record(
            {"path": self.path, "authorization": self.headers.get("Authorization"), "body": body}
        )
        if self.path in ("/release_memory_occupation", "/resume_memory_occupation"):
            self._json(200, {"success": True, "message": "fake"})
        elif self.path == "/v1/chat/completions":
            self._chat(body)
        else:
            self._json(404, {"detail": "not found"})

    def _chat(self, body: dict[str, Any]) -> None:
        prompt = str(body["messages"][-1]["content"])
        name = prompt.removeprefix("canned:") if prompt.startswith("canned:") else ""
        if name in CANNED_ERRORS:
            status, text = CANNED_ERRORS[name]
            self._send(status, text.encode(), "application/json")
            return
        if body.get("stream"):
            self._stream()
            return
        message = {"role": "assistant", **CANNED.get(name, DEFAULT_ANSWER)}
        self._json(200, {"id": "fake", "object": "chat.completion", "choices": [
            {"index": 0, "finish_reason": "stop", "message": message}
        ]})  # fmt: skip

    def _stream(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for index in range(self.state.args.stream_chunks):
            chunk = {"choices": [{"index": 0, "delta": {"content": f"tok{index} "}}]}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()
            time.sleep(self.state.args.stream_interval)
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()

    def _json(self, status: int, payload: dict[str, Any]) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json")

    def _send(self, status: int, data: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--record", type=Path)
    parser.add_argument("--health-delay", type=float, default=0.0)
    parser.add_argument("--stream-chunks", type=int, default=5)
    parser.add_argument("--stream-interval", type=float, default=0.0)
    parser.add_argument("--ignore-sigterm", action="store_true")
    parser.add_argument("--child-pid-file", type=Path)
    args = parser.parse_args()

    if args.child_pid_file:
        child = subprocess.Popen([sys.executable, "-c", STUBBORN_CHILD])
        args.child_pid_file.write_text(str(child.pid))

    state = FakeState(args)
    Handler.state = state
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = False  # server_close() then waits for in-flight requests

    def drain(_signum: int, _frame: object) -> None:
        # Like SGLang: /health goes 503, in-flight requests finish, then exit.
        print("fake: SIGTERM, draining", flush=True)
        state.draining = True
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, signal.SIG_IGN if args.ignore_sigterm else drain)
    print(f"fake: listening on 127.0.0.1:{args.port}", flush=True)
    server.serve_forever(poll_interval=0.05)
    server.server_close()
    print("fake: drained, exiting", flush=True)


if __name__ == "__main__":
    main()
