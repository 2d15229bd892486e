"""`rollout` — the command line.

    rollout plan MODEL [--revision REV] [--json]
    rollout prep MODEL [--revision REV] [--target local|modal] [--json]

Bad input (unknown model, bad revision, inconsistent profile) exits 2 with one line on stderr,
before anything touches the network.
"""

from __future__ import annotations

import argparse
import sys

from rollout.plan import build_plan, render_text
from serving.profile import ProfileError, check_revision, load_profile

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # One line, not argparse's usage block: the caller is often a script or a scheduler.
        fail(message)


def fail(message: str) -> None:
    print(f"rollout: error: {message}", file=sys.stderr)
    raise SystemExit(EXIT_BAD_INPUT)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="rollout", description="Roll out new revisions of large open models.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    plan = commands.add_parser("plan", help="print the plan of a rollout; touches no network")
    plan.add_argument("model")
    plan.add_argument("--revision", help="40-hex commit, branch or tag (default: the profile's)")
    plan.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    prep = commands.add_parser("prep", help="resolve, download, compile and verify a revision")
    prep.add_argument("model")
    prep.add_argument("--revision", help="40-hex commit, branch or tag (default: the profile's)")
    prep.add_argument("--target", choices=["local", "modal"], default="local")
    prep.add_argument("--json", action="store_true", help="print the result as one JSON object")
    return parser


def plan_command(args: argparse.Namespace) -> None:
    try:
        plan = build_plan(load_profile(args.model), args.revision)
    except (ProfileError, ValueError) as exc:
        fail(str(exc))
    print(plan.model_dump_json(indent=2) if args.json else render_text(plan))


def prep_command(args: argparse.Namespace) -> None:
    try:
        profile = load_profile(args.model)
        if args.revision:
            check_revision(args.revision)
    except (ProfileError, ValueError) as exc:
        fail(str(exc))
    # Imported only now: starting Prefect costs seconds, and bad input must fail before it.
    from flows.prep import prep

    try:
        report = prep(profile.name, args.revision, args.target)
    except Exception as exc:  # the flow's logs have the details; the caller gets one line
        print(f"rollout: prep failed: {_one_line(exc)}", file=sys.stderr)
        raise SystemExit(EXIT_FAILED) from None
    if args.json:
        print(report.model_dump_json())
    else:
        print(
            f"{report.model}@{report.revision}: {report.files} files, "
            f"{report.bytes_total / 2**30:.2f} GiB verified={report.verified} "
            f"compile={report.compile_status} ({report.compile_reason}) → {report.weights_path}"
        )


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    {"plan": plan_command, "prep": prep_command}[args.command](args)


if __name__ == "__main__":
    main()
