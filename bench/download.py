"""Benchmark our download (snapshot_download + parallel verification + sentinel) against the
plain `hf download` CLI, in one run, against the local mirror.

    .venv/bin/python bench/download.py [--rounds 2]

A 1 GiB repo of 4 shards is built once into .rollout/bench/mirror (reruns reuse it). The mirror
runs in its own process, so neither client shares a GIL with the server; both clients run as
subprocesses with the same HF_ENDPOINT, each into a fresh directory, in alternating order
(a b, b a, ...) so page-cache and ordering effects cancel. Target: ours / hf <= 1.3.
Then: a rerun on the finished directory (valid sentinel): wall time and mirror requests.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from dev.demo_model import make_synthetic_repo  # noqa: E402
from dev.mirror_store import MiB, MirrorStore  # noqa: E402

BENCH_HOME = REPO_ROOT / ".rollout" / "bench"
MIRROR_ROOT = BENCH_HOME / "mirror"
REPO_ID = "bench/one-gib"
TAG = "bench-v1"
SHARD_SIZES = [256 * MiB] * 4
TARGET_RATIO = 1.3
SENTINEL_BUDGET_S = 0.5
RUN_TIMEOUT_S = 600


def ensure_bench_repo() -> tuple[MirrorStore, str]:
    """The 1 GiB repo in the cached mirror store; built on first use (~10 s)."""
    store = MirrorStore(MIRROR_ROOT)
    if store.has_repo(REPO_ID) and TAG in store.refs(REPO_ID).tags:
        return store, store.refs(REPO_ID).tags[TAG]
    sha = make_synthetic_repo(store, REPO_ID, SHARD_SIZES, seed=7, tags=[TAG])
    return store, sha


def warm(paths: list[Path]) -> None:
    """Read every file once so each timed run starts from the same (warm) page cache."""
    for path in paths:
        with path.open("rb", buffering=0) as f:
            while f.read(8 * MiB):
                pass


@contextmanager
def mirror_process(root: Path) -> Iterator[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "dev.mirror", "--root", str(root), "--host", "127.0.0.1"],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError("the mirror did not start")
        yield json.loads(line)["url"]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def client_env(endpoint: str, home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    return env | {
        "HF_ENDPOINT": endpoint,
        "HF_HOME": str(home),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    }


def timed(argv: list[str], env: dict[str, str]) -> float:
    began = time.perf_counter()
    proc = subprocess.run(
        argv, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S
    )
    elapsed = time.perf_counter() - began
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[:3]} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="pairs of runs, order alternating")
    args = parser.parse_args()

    store, sha = ensure_bench_repo()
    files = [store.file_path(REPO_ID, sha, f.path) for f in store.revision(REPO_ID, sha).files]
    total = sum(path.stat().st_size for path in files)
    warm(files)
    hf_cli = str(Path(sys.executable).with_name("hf"))
    scratch = Path(tempfile.mkdtemp(prefix="runs-", dir=BENCH_HOME))
    times: dict[str, list[float]] = {"hf download": [], "ours (download+verify)": []}
    try:
        with mirror_process(MIRROR_ROOT) as url:
            env = client_env(url, scratch / "hf-home")

            def run(name: str, index: int) -> None:
                out = scratch / f"{index}-{'hf' if name.startswith('hf') else 'ours'}"
                if name.startswith("hf"):
                    argv = [hf_cli, "download", REPO_ID, "--revision", sha, "--local-dir", str(out)]
                else:
                    argv = [sys.executable, "-m", "serving.weights", "download", REPO_ID,
                            "--revision", sha, "--dir", str(out)]  # fmt: skip
                times[name].append(timed(argv, env))
                # Keep disk use low: drop every result except the newest of ours (reused below).
                if name.startswith("hf"):
                    shutil.rmtree(out)
                else:
                    for old in scratch.glob("*-ours"):
                        if old != out:
                            shutil.rmtree(old)

            names = list(times)
            index = 0
            for round_number in range(args.rounds):
                order = names if round_number % 2 == 0 else names[::-1]
                for name in order:
                    run(name, index)
                    index += 1

            # Rerun on a finished directory: the sentinel must answer, offline and at once.
            last = max(scratch.glob("*-ours"), key=lambda p: p.stat().st_mtime)
            httpx.post(f"{url}/_mirror/requests/clear")
            os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
            from serving.weights.download import download_repo

            began = time.perf_counter()
            result = download_repo(REPO_ID, sha, last, endpoint=url, progress=None)
            rerun_s = time.perf_counter() - began
            requests = len(httpx.get(f"{url}/_mirror/requests").json())
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    print(f"repo: {REPO_ID}@{sha[:8]}, {len(files)} files, {total / MiB:.0f} MiB, "
          f"{os.cpu_count()} CPUs, {args.rounds} round(s), alternating order")  # fmt: skip
    for name, samples in times.items():
        mean = statistics.mean(samples)
        print(f"  {name:24s} " + " ".join(f"{s:6.2f}s" for s in samples)
              + f"   mean {mean:6.2f}s  {total / MiB / mean:7.0f} MiB/s")  # fmt: skip
    ratio = statistics.mean(times["ours (download+verify)"]) / statistics.mean(times["hf download"])
    verdict = "ok" if ratio <= TARGET_RATIO else "ABOVE TARGET"
    print(f"  ratio ours / hf download: {ratio:.2f}x (target <= {TARGET_RATIO}x) {verdict}")
    print(f"  rerun with sentinel: {rerun_s * 1000:.1f} ms, {requests} mirror request(s), "
          f"cached={result.cached} (target <= {SENTINEL_BUDGET_S}s, 0 requests)")  # fmt: skip


if __name__ == "__main__":
    main()
