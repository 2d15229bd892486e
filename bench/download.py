"""Benchmark our prep download (download, hashed as it arrives + proof + sentinel) against the
plain `hf download` CLI, in one run, against the local mirror.

    .venv/bin/python bench/download.py [--rounds 3]

A 1 GiB repo of 4 shards is built once into .rollout/bench/mirror (reruns reuse it). The mirror
runs in its own process, so no client shares a GIL with the server; every client runs as a
subprocess with the same HF_ENDPOINT, each into a fresh directory, in rotating order so
page-cache and ordering effects cancel. Ours runs both ways of hashing in flight
(serving.weights.fetch): "stream" (chunks hashed on their way to disk) and "reread" (each file
read back from the page cache right after huggingface_hub wrote it). Target: ours / hf <= 1.05.
Reported too: the bytes the proof read from disk (0 for a fresh download), the same for the
verify stage on the finished directory, and a rerun on it (valid sentinel): wall time and
mirror requests.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
# Read by huggingface_hub at import: the in-process rerun below shows no bars.
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"

from dev.demo_model import make_synthetic_repo  # noqa: E402
from dev.mirror_store import MiB, MirrorStore  # noqa: E402
from serving.weights.download import download_repo, read_sentinel  # noqa: E402
from serving.weights.verify import fresh_evidence, verify  # noqa: E402

BENCH_HOME = REPO_ROOT / ".rollout" / "bench"
MIRROR_ROOT = BENCH_HOME / "mirror"
REPO_ID = "bench/one-gib"
TAG = "bench-v1"
SHARD_SIZES = [256 * MiB] * 4
TARGET_RATIO = 1.05
HF = "hf download"
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


class Run(NamedTuple):
    wall_s: float
    cpu_s: float  # the client's user + system time: what it costs, whatever else runs
    stdout: str


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(argv: list[str], env: dict[str, str]) -> Run:
    began, cpu = time.perf_counter(), children_cpu_s()
    proc = subprocess.run(
        argv, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S
    )
    elapsed = time.perf_counter() - began
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[:3]} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return Run(elapsed, children_cpu_s() - cpu, proc.stdout)


def ours(method: str) -> str:
    return f"ours, hashing {method}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="runs of each, order rotating")
    args = parser.parse_args()

    store, sha = ensure_bench_repo()
    files = [store.file_path(REPO_ID, sha, f.path) for f in store.revision(REPO_ID, sha).files]
    total = sum(path.stat().st_size for path in files)
    warm(files)
    hf_cli = str(Path(sys.executable).with_name("hf"))
    scratch = Path(tempfile.mkdtemp(prefix="runs-", dir=BENCH_HOME))
    times: dict[str, list[float]] = {HF: [], ours("stream"): [], ours("reread"): []}
    cpu: dict[str, list[float]] = {name: [] for name in times}
    proof_read: dict[str, list[int]] = {ours("stream"): [], ours("reread"): []}
    try:
        with mirror_process(MIRROR_ROOT) as url:
            env = client_env(url, scratch / "hf-home")

            def run(name: str, index: int) -> None:
                out = scratch / f"{index}-{'hf' if name == HF else 'ours'}"
                if name == HF:
                    argv = [hf_cli, "download", REPO_ID, "--revision", sha, "--local-dir", str(out)]
                else:
                    argv = [sys.executable, "-m", "serving.weights", "download", REPO_ID,
                            "--revision", sha, "--dir", str(out),
                            "--hashing", name.rsplit(" ", 1)[1]]  # fmt: skip
                client = timed(argv, env)
                times[name].append(client.wall_s)
                cpu[name].append(client.cpu_s)
                if name != HF:
                    proof_read[name].append(json.loads(client.stdout)["proof_bytes_read"])
                # Keep disk use low: drop every result except the newest of ours (reused below).
                if name == HF:
                    shutil.rmtree(out)
                else:
                    for old in scratch.glob("*-ours"):
                        if old != out:
                            shutil.rmtree(old)

            names = list(times)
            index = 0
            for round_number in range(args.rounds):
                shift = round_number % len(names)
                for name in names[shift:] + names[:shift]:
                    run(name, index)
                    index += 1

            # The verify stage on the finished directory: the sentinel's stamps, no reads.
            last = max(scratch.glob("*-ours"), key=lambda p: p.stat().st_mtime)
            manifest = read_sentinel(last, REPO_ID, sha)
            assert manifest is not None
            stage = verify(last, manifest.files, evidence=fresh_evidence(manifest))

            # Rerun on a finished directory: the sentinel must answer, offline and at once.
            httpx.post(f"{url}/_mirror/requests/clear")
            began = time.perf_counter()
            result = download_repo(REPO_ID, sha, last, endpoint=url, progress=None)
            rerun_s = time.perf_counter() - began
            requests = len(httpx.get(f"{url}/_mirror/requests").json())
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    print(f"repo: {REPO_ID}@{sha[:8]}, {len(files)} files, {total / MiB:.0f} MiB, "
          f"{os.cpu_count()} CPUs, {args.rounds} round(s), rotating order")  # fmt: skip
    for name, samples in times.items():
        mean = statistics.mean(samples)
        print(f"  {name:24s} " + " ".join(f"{s:6.2f}s" for s in samples)
              + f"   mean {mean:6.2f}s  {total / MiB / mean:5.0f} MiB/s"
              + f"  cpu {statistics.mean(cpu[name]):5.2f}s")  # fmt: skip
    baseline, baseline_cpu = statistics.mean(times[HF]), statistics.mean(cpu[HF])
    for name, reads in proof_read.items():
        ratio = statistics.mean(times[name]) / baseline
        verdict = "ok" if ratio <= TARGET_RATIO else "ABOVE TARGET"
        print(f"  ratio {name} / hf download: {ratio:.2f}x (target <= {TARGET_RATIO}x) {verdict}, "
              f"cpu {statistics.mean(cpu[name]) / baseline_cpu:.2f}x; "
              f"proof read {max(reads) / MiB:.0f} MiB from disk")  # fmt: skip
    print(f"  verify stage on the finished directory: read {stage.bytes_hashed / MiB:.0f} MiB, "
          f"{stage.bytes_trusted / MiB:.0f} MiB by stamp, {stage.seconds:.3f}s")  # fmt: skip
    print(f"  rerun with sentinel: {rerun_s * 1000:.1f} ms, {requests} mirror request(s), "
          f"cached={result.cached} (target <= {SENTINEL_BUDGET_S}s, 0 requests)")  # fmt: skip


if __name__ == "__main__":
    main()
