"""FAKE compile_deep_gemm, for fault injection only: it behaves like the real one's process
structure (a parent that spawns a "server" child and polls it) so tests can make the child
die, hang, or the parent lie about success — none of which a real GPU-less run can produce.

    fake_compile_deep_gemm.py MODE [ignored server flags...]
MODE: ok | child-dies | no-success-line | exit-1 | hang | flaky | slow-exit
slow-exit is the real tool's ending: success printed, its server stopped, the parent exiting
some time after (the real one stops its server only after the success line).
flaky fails (exit 1) the first $FAKE_COMPILE_FAILURES times, counted in $FAKE_COMPILE_COUNTER.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
from pathlib import Path

SUCCESS = "DeepGEMM Kernels compilation finished successfully."


def server(mode: str) -> None:
    print("server: capturing DeepGEMM calls", flush=True)
    if mode == "child-dies":
        time.sleep(0.5)
        raise SystemExit(7)
    time.sleep(3600 if mode == "hang" else 0.5)


def flaky_mode() -> str:
    counter = Path(os.environ["FAKE_COMPILE_COUNTER"])
    attempt = int(counter.read_text()) + 1 if counter.exists() else 1
    counter.write_text(str(attempt))
    return "exit-1" if attempt <= int(os.environ["FAKE_COMPILE_FAILURES"]) else "ok"


def main() -> None:
    mode = flaky_mode() if sys.argv[1] == "flaky" else sys.argv[1]
    print("Begin DeepGEMM Kernels compilation...", flush=True)
    child = multiprocessing.Process(target=server, args=(mode,))
    child.start()
    # Like the real tool: poll the server and never notice it died (until a long timeout).
    if mode in ("child-dies", "hang"):
        time.sleep(3600)
    child.join()
    if mode == "exit-1":
        raise SystemExit(1)
    if mode != "no-success-line":
        print(SUCCESS, flush=True)
    if mode == "slow-exit":
        time.sleep(2)


if __name__ == "__main__":
    main()
