"""Model profiles: one YAML file per model in `models/`, loaded into typed, validated models.

A profile says everything the rollout needs to know about a model: where its weights live on
the Hub, how to serve it, on what hardware, how to prove a new release works, and how to move
traffic onto it. An inconsistent profile is rejected with one line naming the file and field,
before anything is downloaded or any GPU is asked for.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from serving.router.table import DEFAULT_SHADOW_SEND, ShadowSend

MINUTES = 60
# Each replica publishes its measurements every second, and the gates read them all.
MAX_ROUTER_REPLICAS = 16

COMMIT_SHA = re.compile(r"^[0-9a-f]{40}$")
# What git accepts as a branch or tag name, minus the exotic corners (no "..", no "@{", no
# control characters, no leading "-" or "/", no trailing ".lock" or "/").
REF_NAME = re.compile(r"^(?!-)(?!/)(?!.*\.\.)(?!.*@\{)(?!.*//)[A-Za-z0-9._/-]+(?<!\.lock)(?<!/)$")
REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")

# GPU types this project has kernels and recipes for, with their CUDA architecture: the
# DeepGEMM cache is only valid on the architecture it was compiled for.
GPU_ARCHITECTURES: dict[str, str] = {
    "B200": "sm_100",
    "H200": "sm_90",
    "H100": "sm_90",
}

# Flags the rollout sets itself from other profile fields; a profile may not set them in
# `engine.flags`, or two sources of truth would disagree.
MANAGED_FLAGS = {
    "model-path": "the weights volume path",
    "served-model-name": "served_model_name",
    "tp-size": "resources.tp",
    "ep-size": "resources.ep",
    "host": "the supervisor",
    "port": "the supervisor",
    "api-key": "secrets.api_key",
    "config": "the supervisor (secrets only)",
    "revision": "hub.revision (weights are pinned on the volume)",
    "load-format": "dummy_weights (the weights on the volume otherwise)",
}


class ProfileError(ValueError):
    """A profile that cannot be used; the message is one line naming the file and field."""


class _Strict(BaseModel):
    # A misspelled key in a YAML profile must fail, not be silently ignored.
    model_config = ConfigDict(extra="forbid", frozen=True)


class HubSource(_Strict):
    repo: str
    revision: str = Field(description="a 40-hex commit to pin, or a branch/tag to follow")
    allow_patterns: list[str] | None = None
    ignore_patterns: list[str] | None = None

    @field_validator("repo")
    @classmethod
    def _repo_id(cls, repo: str) -> str:
        if not REPO_ID.match(repo):
            raise ValueError(f"{repo!r} is not an 'org/name' repo id")
        return repo

    @field_validator("revision")
    @classmethod
    def _revision(cls, revision: str) -> str:
        return check_revision(revision)

    @property
    def pinned(self) -> bool:
        return is_commit_sha(self.revision)


FlagValue = str | int | float | bool


class Engine(_Strict):
    kind: Literal["sglang", "transformers"]
    version: str
    image: str | None = Field(None, description="container image tag the engine runs in")
    flags: dict[str, FlagValue] = Field(default_factory=dict)
    env: dict[str, str] = Field(default_factory=dict)
    memory_snapshot: bool = Field(
        False, description="CPU+GPU memory snapshot: warm up, release memory, snapshot, resume"
    )

    @field_validator("flags")
    @classmethod
    def _no_managed_flags(cls, flags: dict[str, FlagValue]) -> dict[str, FlagValue]:
        for name in flags:
            if name.startswith("-"):
                raise ValueError(f"write flag {name!r} without leading dashes")
            if name in MANAGED_FLAGS:
                raise ValueError(f"{name!r} is set by the rollout from {MANAGED_FLAGS[name]}")
        return flags

    @model_validator(mode="after")
    def _image_for_sglang(self) -> Engine:
        if self.kind == "sglang" and not self.image:
            raise ValueError("an sglang engine needs a pinned container image")
        if self.memory_snapshot and self.kind != "sglang":
            raise ValueError("memory_snapshot needs the sglang engine")
        return self


class Resources(_Strict):
    gpu: str | None = Field(None, description="GPU type; None runs on the CPU (local target)")
    gpu_count: int = Field(0, ge=0, le=8)
    exact_gpu_type: bool = Field(
        False, description="forbid Modal from upgrading the GPU type (e.g. H100 → H200)"
    )
    tp: int = Field(1, ge=1)
    ep: int = Field(1, ge=1)
    cpu: float = Field(4.0, gt=0)
    memory_mib: int = Field(32 * 1024, gt=0)

    @field_validator("gpu")
    @classmethod
    def _known_gpu(cls, gpu: str | None) -> str | None:
        if gpu is not None and gpu not in GPU_ARCHITECTURES:
            raise ValueError(f"unknown GPU type {gpu!r} (known: {', '.join(GPU_ARCHITECTURES)})")
        return gpu

    @model_validator(mode="after")
    def _parallelism_fits(self) -> Resources:
        if (self.gpu is None) != (self.gpu_count == 0):
            raise ValueError("gpu and gpu_count must be set together")
        devices = self.gpu_count or 1
        if devices % self.tp:
            raise ValueError(f"tp {self.tp} does not divide gpu_count {devices}")
        if self.tp % self.ep:
            raise ValueError(f"ep {self.ep} does not divide tp {self.tp}")
        return self

    @property
    def architecture(self) -> str | None:
        return GPU_ARCHITECTURES[self.gpu] if self.gpu else None

    @property
    def modal_gpu(self) -> str | None:
        """Modal's GPU string, e.g. "B200:8"; "!" pins the type against automatic upgrades."""
        if self.gpu is None:
            return None
        return f"{self.gpu}{'!' if self.exact_gpu_type else ''}:{self.gpu_count}"


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "tool"]
    content: str


class Probe(_Strict):
    """One warmup request and what a valid answer must contain."""

    name: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int = Field(64, ge=1)
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    # repeat the prompt until it is about this many characters (the long-context probe)
    pad_to_chars: int | None = Field(None, ge=1)
    # answer: any well-formed completion, whatever it says (what random weights can pass)
    expect: Literal["content", "reasoning", "content_or_reasoning", "tool_call", "answer"]
    contains: str | None = Field(None, description="case-insensitive substring of the answer")
    tool_name: str | None = Field(None, description="for expect=tool_call: the function called")

    @model_validator(mode="after")
    def _tool_probe_has_tools(self) -> Probe:
        if self.expect == "tool_call" and not self.tools:
            raise ValueError(f"probe {self.name!r} expects a tool call but offers no tools")
        return self


class Gates(_Strict):
    """Canary vs stable over the same window; a canary failing any gate is rolled back."""

    max_error_rate: float = Field(0.01, ge=0, le=1)
    max_error_rate_ratio: float = Field(2.0, ge=1, description="canary error rate / stable's")
    max_ttft_p50_ratio: float = Field(1.5, ge=1)
    max_ttft_p99_ratio: float = Field(2.0, ge=1)
    # Absolute SLOs, whatever stable does: a ratio alone passes a slow canary when stable is
    # slow too (an overloaded stable, a busy host).
    max_ttft_p50_seconds: float | None = Field(None, gt=0)
    max_ttft_p99_seconds: float | None = Field(None, gt=0)
    min_golden_agreement: float = Field(0.9, ge=0, le=1)
    min_shadow_agreement: float = Field(
        0.95, ge=0, le=1, description="a shadow step: share of deterministic copies agreeing"
    )
    min_requests: int = Field(
        20, ge=1, description="fewer canary requests (a shadow step: deterministic copies) = "
        "inconclusive"
    )
    # Golden prompts are asked after a bake, of warm releases: one unanswered this long is a
    # finding (canary silent: the gate fails; stable silent: inconclusive), never a hang.
    max_golden_answer_seconds: float = Field(60.0, gt=0)


class Shadow(_Strict):
    """Copies of live chat requests answered by stable, sent to the canary and compared."""

    percent: float = Field(gt=0, le=100, description="share of stable's chat requests copied")
    seconds: float = Field(gt=0)
    max_in_flight: int = Field(8, ge=1, description="copies in flight at most; more are skipped")
    send: ShadowSend = Field(DEFAULT_SHADOW_SEND, description="'after' stable's whole answer, "
                             "or 'parallel' with stable's request")

    @property
    def how_sent(self) -> str:
        """The send mode in words, as the plan and the report tell it."""
        return {"after": "sent once stable had answered",
                "parallel": "sent alongside stable's request"}[self.send]


class CanaryStep(_Strict):
    """A weighted step {weight, bake_seconds}, or a shadow step {shadow: {percent, seconds}}
    that keeps the canary's weight (0% before any weighted step) and judges its answers to
    copies of stable's requests."""

    weight: int | None = Field(None, ge=0, le=100, description="percent of traffic on the canary")
    bake_seconds: float | None = Field(None, ge=0)
    shadow: Shadow | None = None
    approval: bool = Field(False, description="pause for a human before this step")

    @model_validator(mode="after")
    def _one_kind(self) -> CanaryStep:
        weighted = self.weight is not None and self.bake_seconds is not None
        if self.shadow is not None and (self.weight is not None or self.bake_seconds is not None):
            raise ValueError("a shadow step keeps the canary's weight: no weight or bake_seconds")
        if self.shadow is None and not weighted:
            raise ValueError("a step needs weight and bake_seconds, or shadow")
        return self

    @property
    def seconds(self) -> float:
        """How long the step bakes before it is judged."""
        return self.shadow.seconds if self.shadow is not None else self.bake_seconds or 0.0


class GoldenPrompt(_Strict):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int = Field(32, ge=1)


class Canary(_Strict):
    steps: list[CanaryStep] = Field(min_length=1)
    gates: Gates = Field(default_factory=Gates)
    # A bake with fewer than min_requests canary requests goes on, the same window growing,
    # until they have arrived or the bake reaches this; only then is it inconclusive.
    # None: twice each step's bake (one extension).
    max_bake_seconds: float | None = Field(None, gt=0)
    on_inconclusive: Literal["pause", "rollback"] = "rollback"
    golden_prompts: list[GoldenPrompt] = Field(default_factory=list)
    retire_grace_seconds: float = Field(5 * MINUTES, ge=0)

    @field_validator("steps")
    @classmethod
    def _ends_at_full_traffic(cls, steps: list[CanaryStep]) -> list[CanaryStep]:
        if steps[-1].weight != 100:
            last = "a shadow step" if steps[-1].shadow else steps[-1].weight
            raise ValueError(f"the last canary step must reach weight 100, not {last}")
        weights = [step.weight for step in steps if step.shadow is None]
        if weights != sorted(weights):
            raise ValueError(f"canary weights must not decrease: {weights}")
        return steps

    @model_validator(mode="after")
    def _bake_fits_its_limit(self) -> Canary:
        longest = max(step.seconds for step in self.steps)
        if self.max_bake_seconds is not None and self.max_bake_seconds < longest:
            raise ValueError(
                f"max_bake_seconds {self.max_bake_seconds:g} is shorter than a step's bake"
                f" ({longest:g} s)"
            )
        return self

    def bake_limit(self, step: CanaryStep) -> float:
        """How long `step` may bake while waiting for min_requests."""
        if self.max_bake_seconds is None:
            return 2 * step.seconds
        return self.max_bake_seconds


class Volumes(_Strict):
    weights: str
    deepgemm: str | None = None


class Secrets(_Strict):
    """Names, never values. hf_token: the Modal Secret holding HF_TOKEN (outside Modal the
    token is HF_TOKEN itself). api_key: the Modal Secret holding API_KEY; on the local target,
    the environment variable holding the key."""

    hf_token: str | None = None
    api_key: str | None = None


class Scaling(_Strict):
    min_containers: int = Field(0, ge=0)
    max_containers: int = Field(1, ge=1)
    max_inputs: int = Field(32, ge=1, description="concurrent requests per replica")
    target_inputs: int | None = Field(None, ge=1)
    scaledown_window_seconds: int = Field(20 * MINUTES, ge=2)


class Router(_Strict):
    """The model's router. Replicas share the load behind one address (Modal's load balancer;
    locally, processes accepting on one socket); the gates merge their measurements."""

    replicas: int = Field(1, ge=1, le=MAX_ROUTER_REPLICAS,
                          description="router containers (processes) serving the model")


class Profile(_Strict):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9.-]*$")
    hub: HubSource
    served_model_name: str
    engine: Engine
    resources: Resources
    deepgemm: bool = Field(False, description="precompile DeepGEMM kernels before serving")
    startup_budget_seconds: float = Field(gt=0)
    # For iterating on serving flags: random weights of the revision's architecture, so no
    # download (config and tokenizer only). Such a release is probed but never promoted.
    # Declared before the probes, whose validator reads it.
    dummy_weights: bool = Field(False, description="serve random weights (--load-format dummy)")
    probes: list[Probe] = Field(min_length=1)
    canary: Canary
    volumes: Volumes
    secrets: Secrets = Field(default_factory=Secrets)
    scaling: Scaling = Field(default_factory=Scaling)
    router: Router = Field(default_factory=Router)

    @model_validator(mode="after")
    def _consistent(self) -> Profile:
        if self.deepgemm and (self.engine.kind != "sglang" or self.resources.gpu is None):
            raise ValueError("deepgemm needs the sglang engine on a GPU")
        if self.deepgemm and not self.volumes.deepgemm:
            raise ValueError("deepgemm needs volumes.deepgemm")
        if self.engine.kind == "sglang" and self.resources.gpu is None:
            raise ValueError("the sglang engine needs a GPU")
        return self

    @field_validator("probes")
    @classmethod
    def _dummy_probes(cls, probes: list[Probe], info: ValidationInfo) -> list[Probe]:
        return _answer_only(probes) if info.data.get("dummy_weights") else probes

    def with_dummy_weights(self) -> Profile:
        """This profile serving random weights: its probes check only that the engine
        answers, since what random weights say means nothing."""
        return self.model_copy(update={"dummy_weights": True, "probes": _answer_only(self.probes)})


def _answer_only(probes: list[Probe]) -> list[Probe]:
    return [probe.model_copy(update={"expect": "answer", "contains": None, "tool_name": None})
            for probe in probes]  # fmt: skip


def is_commit_sha(revision: str) -> bool:
    return bool(COMMIT_SHA.match(revision))


def check_revision(revision: str) -> str:
    """A revision is a full 40-hex commit or a plausible branch/tag name; nothing else."""
    if is_commit_sha(revision):
        return revision
    if re.fullmatch(r"[0-9a-fA-F]{7,}", revision):
        # A hex string that is not a full lowercase commit is a typo or a short sha, and would
        # silently resolve as a branch name if we let it.
        raise ValueError(f"revision {revision!r} looks like a commit; give all 40 lowercase hex")
    if REF_NAME.match(revision):
        return revision
    raise ValueError(f"revision {revision!r} is neither a 40-hex commit nor a branch/tag name")


