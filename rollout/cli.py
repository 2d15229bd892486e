"""`rollout` — the command line.

    rollout plan MODEL [--revision REV] [--dummy-weights] [--json]
    rollout prep MODEL [--revision REV] [--target local|modal] [--json]
    rollout run MODEL [--revision REV] [--target local|modal] [--approve] [--keep-serving] [--json]
                      [--dummy-weights]
    rollout status MODEL [--target local|modal] [--json]
    rollout abort MODEL [--target local|modal]

Bad input (unknown model, bad revision, inconsistent profile) exits 2 with one line on stderr,
before anything touches the network.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable

from rollout.orchestration import NoPrefectApi, connect
from serving.config.loader import load_profile, read_profile
from serving.config.profile import Profile, ProfileError, check_revision
from serving.control import lifecycle
from serving.core.errors import EXPECTED_FAILURE_RECORD, one_line
from serving.domain.release import Release
from serving.platforms import get_platform, get_serving

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
# The CLI prints its own summary: Prefect's INFO lines stay in the flow runs' logs, unless the
# caller's environment asks for them here too (=INFO).
CONSOLE_LEVEL = {"PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "WARNING"}
# How Prefect's last line for each task and flow run begins.
PREFECT_RUN_END = "Finished in state "
DUMMY_HELP = "serve random weights (--load-format dummy): no download, never promoted"


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
    plan.add_argument("--dummy-weights", action="store_true", help=DUMMY_HELP)
    prep = commands.add_parser("prep", help="resolve, download, compile and verify a revision")
    prep.add_argument("model")
    prep.add_argument("--revision", help="40-hex commit, branch or tag (default: the profile's)")
    prep.add_argument("--target", choices=["local", "modal"], default="local")
    prep.add_argument("--json", action="store_true", help="print the result as one JSON object")
    run = commands.add_parser("run", help="roll a revision out: canary, then promote or roll back")
    run.add_argument("model")
    run.add_argument("--revision", help="40-hex commit, branch or tag (default: the profile's)")
    run.add_argument("--target", choices=["local", "modal"], default="local")
    run.add_argument("--approve", action="store_true", help="pre-approve every approval gate")
    run.add_argument(
        "--keep-serving", action="store_true", help="local target: leave the releases running"
    )
    run.add_argument("--json", action="store_true", help="print the report as one JSON object")
    run.add_argument("--dummy-weights", action="store_true", help=DUMMY_HELP)
    status = commands.add_parser("status", help="stable, canary, router and history of a model")
    status.add_argument("model")
    status.add_argument("--target", choices=["local", "modal"], default="local")
    status.add_argument("--json", action="store_true")
    abort = commands.add_parser("abort", help="roll back the running canary of a model")
    abort.add_argument("model")
    abort.add_argument("--target", choices=["local", "modal"], default="local")
    return parser


def plan_command(args: argparse.Namespace) -> None:
    # Imported only here: the plan builds Modal's apps, and the SDK takes a second to import
    # that every other command (an abort first of all) would pay.
    from rollout.plan import build_plan, render_text

    try:
        profile = load_profile(args.model)
        plan = build_plan(profile.with_dummy_weights() if args.dummy_weights else profile,
                          args.revision)  # fmt: skip
    except (ProfileError, ValueError) as exc:
        fail(str(exc))
    print(plan.model_dump_json(indent=2) if args.json else render_text(plan))


def _checked(args: argparse.Namespace, load: Callable[[str], Profile] = load_profile) -> Profile:
    """Bad input fails here, before Prefect starts or anything is spent."""
    try:
        profile = load(args.model)
        if getattr(args, "revision", None):
            check_revision(args.revision)
    except (ProfileError, ValueError) as exc:
        fail(str(exc))
    return profile


def _orchestrated() -> None:
    """A Prefect API for the flow runs, before the flows (and so Prefect) are imported."""
    for key, value in CONSOLE_LEVEL.items():
        os.environ.setdefault(key, value)
    try:
        connect()
    except NoPrefectApi as exc:
        fail(str(exc))


class _ToldByTheCli(logging.Filter):
    """The CLI tells how a run ended, and why, in one line: on the console, Prefect's line for
    each run's end and an expected failure's are not said again. A bug's traceback shows."""

    def filter(self, record: logging.LogRecord) -> bool:
        expected = getattr(record, EXPECTED_FAILURE_RECORD, False)
        return not (expected or record.getMessage().startswith(PREFECT_RUN_END))


def _console_told_by_cli() -> None:
    """Once the flows are imported, and with them Prefect's console handler."""
    for handler in logging.getLogger().handlers:
        handler.addFilter(_ToldByTheCli())


def prep_command(args: argparse.Namespace) -> None:
    profile = _checked(args)
    _orchestrated()
    # Imported only now: importing Prefect costs seconds, and bad input must fail before it.
    from flows.prep import prep

    _console_told_by_cli()
    try:
        report = prep(profile.name, args.revision, args.target)
    except Exception as exc:  # the flow's logs have the details; the caller gets one line
        print(f"rollout: prep failed: {one_line(exc)}", file=sys.stderr)
        raise SystemExit(EXIT_FAILED) from None
    if args.json:
        print(report.model_dump_json())
    else:
        print(
            f"{report.model}@{report.revision}: {report.files} files, "
            f"{report.bytes_total / 2**30:.2f} GiB verified={report.verified} "
            f"compile={report.compile_status} ({report.compile_reason}) → {report.weights_path}"
        )


def run_command(args: argparse.Namespace) -> None:
    profile = _checked(args)
    if args.keep_serving:
        os.environ["ROLLOUT_KEEP_SERVING"] = "1"
    _orchestrated()
    from flows.rollout import rollout

    _console_told_by_cli()
    try:
        report = rollout(profile.name, args.revision, args.target, args.approve,
                         args.dummy_weights)  # fmt: skip
    except Exception as exc:
        print(f"rollout: run failed: {one_line(exc)}", file=sys.stderr)
        raise SystemExit(EXIT_FAILED) from None
    finally:
        # Nothing this process started keeps running (or costing) unless asked to.
        get_platform(args.target).shutdown()
    if args.json:
        print(report.model_dump_json())
    else:
        print(report.markdown())
    if report.decision == "rolled-back":
        raise SystemExit(EXIT_FAILED)


def status_command(args: argparse.Namespace) -> None:
    profile = _checked(args, read_profile)
    platform = get_serving(args.target)
    record = platform.release_store().read(profile.name)
    running = [release.id for release in platform.running_releases(profile)]
    status = {
        "model": profile.name,
        "stable": record.stable.model_dump(mode="json") if record.stable else None,
        "canary": record.canary.model_dump(mode="json") if record.canary else None,
        "running": running,
        "router_url": platform.router_url(profile) if running else None,
        "history": [entry.model_dump(mode="json") for entry in record.history],
    }
    if args.json:
        print(json.dumps(status))
        return
    print(f"{profile.name}: stable {_id(record.stable)}, canary {_id(record.canary)}")
    print(f"running: {', '.join(running) or 'nothing'}; router: {status['router_url'] or '-'}")
    for entry in record.history[-10:]:
        print(f"  {entry.at:%Y-%m-%d %H:%M} {entry.revision[:8]} {entry.outcome}: {entry.reason}")


def _id(release: Release | None) -> str:
    return release.id if release else "none"


def abort_command(args: argparse.Namespace) -> None:
    # Only what a rollback uses is imported and checked: it acts as soon as it can.
    profile = _checked(args, read_profile)
    platform = get_serving(args.target)
    # Decided on the record under the store's lock: if the canary is promoted first, it stays.
    entry = lifecycle.revert(profile, platform, lifecycle.ABORT_REASON, flow_run_id=None)
    if entry is None:
        print(f"{profile.name}: no canary to abort")
        return
    lifecycle.retire_released(profile, platform)
    stable = platform.release_store().read(profile.name).stable
    print(f"{profile.name}: canary {entry.revision[:8]} rolled back; stable {_id(stable)}")


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    commands = {
        "plan": plan_command,
        "prep": prep_command,
        "run": run_command,
        "status": status_command,
        "abort": abort_command,
    }
    commands[args.command](args)


if __name__ == "__main__":
    main()
