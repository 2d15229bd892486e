"""The whole plan of a rollout, computed from a profile without touching the network.

`rollout plan glm-5.1` answers "what exactly will this do, on what, with which flags?" before
anything is downloaded or any GPU is paid for.
"""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Literal

from pydantic import BaseModel

from serving.config.layout import DEEPGEMM_MOUNT, DUMMY_DIR, WEIGHTS_MOUNT
from serving.config.profile import CanaryStep, Gates, Profile, check_revision, is_commit_sha
from serving.domain.release import release_id
from serving.engines.deepgemm import COMPILE_TIMEOUT_SECONDS
from serving.engines.sglang import compile_command, serve_command
from serving.platforms.modal.apps import build_compile_app, build_release_app, build_weights_app
from serving.platforms.modal.resources import ENGINE_PORT

# Shown where the commit is only known after `resolve` (a branch or tag in the profile).
UNRESOLVED = "<resolved-commit>"


class RevisionPlan(BaseModel):
    requested: str
    policy: Literal["pinned", "follow"]
    note: str


class ProbePlan(BaseModel):
    name: str
    expect: str
    contains: str | None


class CommandPlan(BaseModel):
    argv: list[str]
    env: dict[str, str]


class Plan(BaseModel):
    model: str
    hub_repo: str
    revision: RevisionPlan
    engine: str
    # random weights (`--load-format dummy`): config and tokenizer only, never promoted
    dummy_weights: bool
    image: str | None
    gpu: str | None
    tp: int
    ep: int
    apps: list[str]
    router_replicas: int
    volumes: dict[str, str]
    secrets: dict[str, str | None]
    serve: CommandPlan
    compile: CommandPlan | None
    startup_budget_seconds: float
    probes: list[ProbePlan]
    canary_steps: list[CanaryStep]
    gates: Gates
    max_bake_seconds: float | None
    on_inconclusive: str


def build_plan(profile: Profile, revision: str | None = None) -> Plan:
    """The plan for `revision` (default: the profile's policy). Raises ValueError on a bad one."""
    requested = check_revision(revision) if revision else profile.hub.revision
    pinned = is_commit_sha(requested)
    commit = requested if pinned else UNRESOLVED
    # Dummy weights are served from the config and tokenizer alone, in a directory of their own.
    weights_root = WEIGHTS_MOUNT / DUMMY_DIR if profile.dummy_weights else WEIGHTS_MOUNT
    weights_path = weights_root / profile.hub.repo / commit
    deepgemm_path = _deepgemm_path(profile)
    serve = serve_command(
        profile, weights_path=weights_path, deepgemm_path=deepgemm_path, port=ENGINE_PORT
    )
    compile_plan = None
    # A dummy rollout compiles nothing ahead: SGLang compiles what the cache lacks at startup.
    if profile.deepgemm and deepgemm_path is not None and not profile.dummy_weights:
        compile_cmd = compile_command(
            profile,
            weights_path=weights_path,
            deepgemm_path=deepgemm_path,
            port=ENGINE_PORT,
            timeout_seconds=COMPILE_TIMEOUT_SECONDS,
        )
        compile_plan = CommandPlan(argv=compile_cmd.argv, env=compile_cmd.env)
    return Plan(
        model=profile.name,
        hub_repo=profile.hub.repo,
        revision=RevisionPlan(
            requested=requested,
            policy="pinned" if pinned else "follow",
            note="used as is"
            if pinned
            else f"branch/tag {requested!r} is resolved to a commit before anything else",
        ),
        engine=f"{profile.engine.kind} {profile.engine.version}",
        dummy_weights=profile.dummy_weights,
        image=profile.engine.image,
        gpu=profile.resources.modal_gpu,
        tp=profile.resources.tp,
        ep=profile.resources.ep,
        apps=_app_names(profile, commit),
        router_replicas=profile.router.replicas,
        volumes={str(WEIGHTS_MOUNT): profile.volumes.weights}
        | ({str(DEEPGEMM_MOUNT): profile.volumes.deepgemm} if profile.deepgemm else {}),
        secrets=profile.secrets.model_dump(),
        serve=CommandPlan(argv=serve.argv, env=serve.env),
        compile=compile_plan,
        startup_budget_seconds=profile.startup_budget_seconds,
        probes=[
            ProbePlan(name=probe.name, expect=probe.expect, contains=probe.contains)
            for probe in profile.probes
        ],
        canary_steps=profile.canary.steps,
        gates=profile.canary.gates,
        max_bake_seconds=profile.canary.max_bake_seconds,
        on_inconclusive=profile.canary.on_inconclusive,
    )


def _deepgemm_path(profile: Profile) -> PurePosixPath | None:
    architecture = profile.resources.architecture
    return DEEPGEMM_MOUNT / architecture if profile.deepgemm and architecture else None


def _app_names(profile: Profile, commit: str) -> list[str]:
    """The Modal Apps this rollout deploys, built here so a profile that can't be turned into
    valid Modal specs fails in `plan`, not after the download."""
    if profile.engine.kind != "sglang":
        return []
    names = [build_weights_app(profile).app.name]
    if profile.deepgemm and not profile.dummy_weights:
        names.append(build_compile_app(profile).app.name)
    if is_commit_sha(commit):
        names.append(build_release_app(profile, commit).app.name)
    else:
        names.append(release_id(profile, "<rev8>"))
    return [name for name in names if name]


def render_text(plan: Plan) -> str:
    lines = [
        f"model     {plan.model}  ({plan.hub_repo})",
        f"revision  {plan.revision.requested} [{plan.revision.policy}] — {plan.revision.note}",
        f"engine    {plan.engine}  image={plan.image or '-'}",
        *(["weights   DUMMY: random, from config and tokenizer only (no download, no"
           " compile); served at 0% beside stable, probed, retired: never weighted or"
           " promoted"] if plan.dummy_weights else []),
        f"gpu       {plan.gpu or 'cpu'}  tp={plan.tp} ep={plan.ep}",
        f"apps      {', '.join(plan.apps) or '- (local target)'}",
        f"router    {plan.router_replicas} replica{'s' * (plan.router_replicas > 1)}"
        " (the gates merge every replica's measurements)",
        "volumes   " + ", ".join(f"{mount} ← {name}" for mount, name in plan.volumes.items()),
        "secrets   " + ", ".join(f"{k}={v}" for k, v in plan.secrets.items() if v),
        "serve     " + " ".join(plan.serve.argv),
        "          env " + " ".join(f"{k}={v}" for k, v in plan.serve.env.items()),
    ]
    if plan.compile:
        lines.append("compile   " + " ".join(plan.compile.argv))
    lines.append(f"startup   ≤ {plan.startup_budget_seconds:.0f} s, then probes:")
    for probe in plan.probes:
        contains = f" containing {probe.contains!r}" if probe.contains else ""
        lines.append(f"          - {probe.name}: expect {probe.expect}{contains}")
    if plan.dummy_weights:
        return "\n".join(lines)  # no canary steps, no gates: it never takes traffic
    lines.append("canary    " + " → ".join(
        _step(s) + (" (approval)" if s.approval else "") for s in plan.canary_steps
    ))  # fmt: skip
    gates = plan.gates
    p50 = _ttft_limit(gates.max_ttft_p50_ratio, gates.max_ttft_p50_seconds)
    p99 = _ttft_limit(gates.max_ttft_p99_ratio, gates.max_ttft_p99_seconds)
    longest = "twice its length" if plan.max_bake_seconds is None else f"{plan.max_bake_seconds:g}s"
    lines += [
        f"gates     errors ≤ {gates.max_error_rate:.1%} and ≤ {gates.max_error_rate_ratio}x stable,"
        f" TTFT p50 ≤ {p50}, p99 ≤ {p99},"
        f" golden ≥ {gates.min_golden_agreement:.0%} (each answer ≤"
        f" {gates.max_golden_answer_seconds:g}s),"
        f" shadow ≥ {gates.min_shadow_agreement:.0%} agreement",
        f"          ≥ {gates.min_requests} canary requests a step: its bake extends up to"
        f" {longest} for them, else {plan.on_inconclusive}",
    ]
    return "\n".join(lines)


def _step(step: CanaryStep) -> str:
    if step.shadow is None:
        return f"{step.weight}% for {step.bake_seconds:.0f}s"
    shadow = step.shadow
    return (f"shadow {shadow.percent:g}% of stable's requests for {shadow.seconds:.0f}s "
            f"({shadow.how_sent}, ≤ {shadow.max_in_flight} in flight)")


def _ttft_limit(ratio: float, seconds: float | None) -> str:
    return f"{ratio}x" + (f" and ≤ {seconds:g}s" if seconds is not None else "")
