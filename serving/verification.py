"""Stage 4, verify: prove the weights, the kernels and the serve command before any deploy.

- every file of the revision proven against the manifest (the Hub's metadata): read and hashed
  unless the sentinel's stamp of it shows it unchanged since the download hashed it, that
  download being recent (serving.weights.verify.fresh_evidence); only bad or missing files
  re-fetched (hashed as they arrive), then a fresh sentinel;
- the DeepGEMM marker present for the CURRENT cache key (a changed flag or image means the
  compiled kernels are for something else);
- the serve command accepted by SGLang's own parser where SGLang is installed (the engine
  image), else by the flag table the profile was already checked against.

A dummy-weights release has no weights and needs no kernels (SGLang compiles what the cache
volume lacks at startup, within the startup budget): its proof is the serving config it will
start from (`check_serving_config`) and the same serve command, with `--load-format dummy`.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from pydantic import BaseModel

from serving.config.layout import deepgemm_dir, weights_dir
from serving.config.profile import Profile
from serving.domain.release import VerifyResult
from serving.engines.deepgemm import read_marker
from serving.engines.sglang import deepgemm_cache_key, parse_serve_argv, serve_command
from serving.weights.download import read_sentinel, repair_download
from serving.weights.models import VerifyReport, WeightsError
from serving.weights.verify import fresh_evidence, verify


def verify_revision(
    profile: Profile,
    revision: str,
    *,
    weights_root: Path,
    deepgemm_root: Path | None,
    compile_required: bool,
    token: str | None = None,
    endpoint: str | None = None,
) -> VerifyResult:
    """`compile_required` is False where kernels cannot be compiled (the local CPU target):
    then a missing marker is reported as skipped rather than as a problem."""
    directory = weights_dir(weights_root, profile, revision)
    manifest = read_sentinel(directory, profile.hub.repo, revision)
    if manifest is None:
        return VerifyResult(
            weights=VerifyReport(),
            repaired=[],
            compile_status="not-required",
            compile_key=None,
            problems=[f"no verified download of {profile.hub.repo}@{revision[:8]} in {directory}"],
        )
    # At most one read of each file: a repair starts from this report.
    report = verify(directory, manifest.files, evidence=fresh_evidence(manifest))
    repaired: list[str] = []
    if not report.passed:
        repaired = report.broken
        report, _ = repair_download(directory, manifest, report, token=token, endpoint=endpoint)

    problems = [] if report.passed else [f"weights: {report.summary()}"]
    compile_status, compile_key = _check_kernels(
        profile, directory, deepgemm_root, compile_required, problems
    )
    problem = _check_serve_command(profile, directory)
    if problem:
        problems.append(problem)
    return VerifyResult(
        weights=report,
        repaired=repaired,
        compile_status=compile_status,
        compile_key=compile_key,
        problems=problems,
    )


def _check_kernels(
    profile: Profile,
    directory: Path,
    deepgemm_root: Path | None,
    compile_required: bool,
    problems: list[str],
) -> tuple[str, str | None]:
    if not profile.deepgemm:
        return "not-required", None
    key = deepgemm_cache_key(profile, (directory / "config.json").read_bytes())
    if deepgemm_root is not None and read_marker(deepgemm_dir(deepgemm_root, profile), key):
        return "compiled", key
    if compile_required:
        problems.append(f"DeepGEMM kernels for cache key {key} were never compiled")
        return "missing", key
    return "skipped", key


def _check_serve_command(profile: Profile, directory: Path) -> str | None:
    if profile.engine.kind != "sglang" or importlib.util.find_spec("sglang") is None:
        return None  # the flag table check ran when the profile loaded
    command = serve_command(profile, weights_path=directory, deepgemm_path=None, port=8000)
    return parse_serve_argv(command.argv)


class ServingConfigCheck(BaseModel):
    """What a dummy-weights release will serve from, and what stands in its way."""

    directory: str
    files: list[str]
    problems: list[str]

    def proven(self) -> str:
        """The directory, once nothing stands in the way; else one line naming the problems."""
        if self.problems:
            raise WeightsError(f"dummy weights at {self.directory}: " + "; ".join(self.problems))
        return self.directory


def check_serving_config(profile: Profile, directory: Path) -> ServingConfigCheck:
    """A dummy-weights release's verify: the config SGLang builds the random model from is
    there and parses, and the serve command (with `--load-format dummy`) is accepted."""
    problems = []
    config = directory / "config.json"
    try:
        json.loads(config.read_bytes())
    except (OSError, ValueError) as exc:
        problems.append(f"no readable config.json ({type(exc).__name__})")
    problem = _check_serve_command(profile.with_dummy_weights(), directory)
    if problem:
        problems.append(problem)
    # huggingface_hub keeps its download bookkeeping under .cache/: not the model's files.
    files = sorted(
        path.relative_to(directory).as_posix()
        for path in directory.rglob("*")
        if path.is_file() and not path.relative_to(directory).parts[0].startswith(".")
    )
    return ServingConfigCheck(directory=str(directory), files=files, problems=problems)
