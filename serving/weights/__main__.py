"""python -m serving.weights download|verify ..."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import get_args

from serving.config.layout import SENTINEL_NAME
from serving.weights.download import Transfer, download_repo
from serving.weights.fetch import DEFAULT_HASH_METHOD, HashMethod
from serving.weights.hub import BACKOFF_FIRST_S, DOWNLOAD_ATTEMPTS, resolve_revision
from serving.weights.models import Manifest, WeightsError
from serving.weights.verify import verify


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving.weights", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    get = sub.add_parser("download", help="download + verify + sentinel")
    get.add_argument("repo")
    get.add_argument("--revision", required=True)
    get.add_argument("--dir", type=Path, required=True)
    get.add_argument("--endpoint", default=None)
    get.add_argument("--token-env", default=None, help="name of the env var holding the token")
    get.add_argument("--attempts", type=int, default=DOWNLOAD_ATTEMPTS)
    get.add_argument("--backoff", type=float, default=BACKOFF_FIRST_S)
    get.add_argument("--high-performance", action="store_true")
    get.add_argument("--hashing", choices=get_args(HashMethod), default=DEFAULT_HASH_METHOD)
    check = sub.add_parser("verify", help="hash the files against the sentinel's manifest")
    check.add_argument("dir", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    # Our own progress lines replace huggingface_hub's tqdm bars.
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()
    try:
        if args.command == "download":
            token = os.environ.get(args.token_env) if args.token_env else None
            sha = resolve_revision(args.repo, args.revision, token, endpoint=args.endpoint)
            result = download_repo(
                args.repo, sha, args.dir, token=token, endpoint=args.endpoint,
                transfer=Transfer(attempts=args.attempts, backoff_s=args.backoff,
                                  high_performance=args.high_performance, hashing=args.hashing),
            )  # fmt: skip
            print(result.model_dump_json(exclude={"manifest": {"files"}}))
            return 0
        manifest = Manifest.model_validate_json((args.dir / SENTINEL_NAME).read_text())
        report = verify(args.dir, manifest.files)
        print(report.model_dump_json())
        return 0 if report.passed else 1
    except WeightsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except FileNotFoundError:
        print(f"error: no sentinel in {args.dir}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
