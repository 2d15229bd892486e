"""Benchmark our parallel verification against sequential `sha256sum`, same files, same run.

    .venv/bin/python bench/verify.py [--rounds 3]

Files: the 1 GiB, 4-shard repo of bench/download.py (built once into .rollout/bench/mirror).
Page cache: every file is read once before timing and the machine has far more RAM than 1 GiB,
so every timed run (ours and sha256sum alike) reads from a warm cache; runs alternate in order.
Also measured: our verification with one worker, to separate "parallel" from "OpenSSL's sha256
(SHA-NI) vs coreutils'". Target: sha256sum / ours >= 1.6.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from bench.download import REPO_ID, ensure_bench_repo, warm  # noqa: E402
from dev.mirror_store import MiB  # noqa: E402
from serving.weights.models import FileEntry  # noqa: E402
from serving.weights.verify import default_hash_workers, verify  # noqa: E402

TARGET_SPEEDUP = 1.6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    store, sha = ensure_bench_repo()
    meta = store.revision(REPO_ID, sha)
    directory = store.repo_dir(REPO_ID) / "revisions" / sha
    entries = [
        FileEntry(
            path=f.path, size=f.size, lfs=f.lfs is not None,
            sha256=f.lfs.sha256 if f.lfs else None, blob_id=f.blob_id,
        )
        for f in meta.files
    ]  # fmt: skip
    shards = [directory / e.path for e in entries if e.lfs]
    total = sum(e.size for e in entries)
    warm([directory / e.path for e in entries])

    def ours(workers: int | None) -> float:
        began = time.perf_counter()
        report = verify(directory, entries, workers=workers)
        elapsed = time.perf_counter() - began
        assert report.passed, report.summary()
        return elapsed

    def sha256sum() -> float:
        began = time.perf_counter()
        subprocess.run(["sha256sum", *map(str, shards)], check=True, capture_output=True)
        return time.perf_counter() - began

    runs: dict[str, list[float]] = {
        f"ours, {default_hash_workers()} threads": [],
        "ours, 1 thread": [],
        "sha256sum (sequential)": [],
    }
    steps = [lambda: ours(None), lambda: ours(1), sha256sum]
    for round_number in range(args.rounds):
        order = list(zip(runs, steps, strict=True))
        if round_number % 2:
            order.reverse()
        for name, step in order:
            runs[name].append(step())

    print(
        f"{len(entries)} files, {total / MiB:.0f} MiB ({len(shards)} shards), {os.cpu_count()} "
        f"CPUs, warm page cache, {args.rounds} rounds, alternating order"
    )
    for name, samples in runs.items():
        best, median = min(samples), statistics.median(samples)
        print(f"  {name:26s} median {median:6.3f}s  best {best:6.3f}s  "
              f"{total / MiB / median:6.0f} MiB/s")  # fmt: skip
    parallel, single, baseline = (statistics.median(s) for s in runs.values())
    speedup = baseline / parallel
    verdict = "ok" if speedup >= TARGET_SPEEDUP else "BELOW TARGET"
    print(f"  speedup vs sha256sum: {speedup:.2f}x (target >= {TARGET_SPEEDUP}x) {verdict}")
    print(f"  of which from threads: {single / parallel:.2f}x (1 thread -> all cores)")


if __name__ == "__main__":
    main()
