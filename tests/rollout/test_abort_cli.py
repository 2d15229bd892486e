"""`rollout abort` is the operator's brake (issue 11: the canary at 0% within a second). Most of
its time was the interpreter importing what an abort never uses: the Hub client, the weights'
verification, the compiler, Prefect. The real CLI, run as a process, must do its work with none
of them loaded, and must work while the profile names an engine flag SGLang rejects: a rollback
starts no engine, and an operator's typo must not hold the brake. (An abort of a running canary,
end to end, is tests/flows/test_rollout_interrupted_flow.py's; every module it uses is imported
here too.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from serving.config.loader import DEFAULT_MODELS_DIR, load_profile
from serving.config.profile import ProfileError
from serving.core.home import REPO_ROOT

MODEL = "brake"
# What an abort must not load: each costs a tenth of a second or more at every start, and none
# of them routes traffic or writes a release record.
NEVER_IMPORTED = (
    "prefect", "modal", "sglang", "torch", "transformers", "huggingface_hub",
    "serving.verification", "serving.weights.download", "serving.weights.hub",
    "serving.engines.deepgemm", "serving.platforms.local.platform",
)  # fmt: skip
# The CLI as `python -m rollout.cli ...` runs it, telling on stderr, at its exit, what it loaded.
CLI_TELLING_MODULES = """
import atexit, json, runpy, sys
atexit.register(lambda: print(json.dumps(sorted(sys.modules)), file=sys.stderr))
sys.argv[0] = "rollout"
runpy.run_module("rollout.cli", run_name="__main__", alter_sys=True)
"""


def test_abort_loads_nothing_it_never_uses_and_a_mistyped_flag_does_not_hold_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    models = tmp_path / "models"
    models.mkdir()
    (models / "shared").symlink_to(DEFAULT_MODELS_DIR / "shared")
    profile = yaml.safe_load((DEFAULT_MODELS_DIR / "glm-5.1.yaml").read_text())
    profile |= {"name": MODEL, "served_model_name": MODEL}
    # A flag SGLang 0.5.23 rejects (renamed dsa-*), typed while a canary bakes.
    profile["engine"]["flags"]["nsa-decode-backend"] = "trtllm"
    (models / f"{MODEL}.yaml").write_text(yaml.safe_dump(profile))
    monkeypatch.setenv("ROLLOUT_MODELS_DIR", str(models))
    with pytest.raises(ProfileError, match="nsa-decode-backend"):
        load_profile(MODEL)  # what prep, run and plan say, before anything is spent

    env = {**os.environ, "ROLLOUT_HOME": str(tmp_path / "home"), "PYTHONPATH": str(REPO_ROOT)}
    aborted = subprocess.run([sys.executable, "-c", CLI_TELLING_MODULES, "abort", MODEL],
                             env=env, capture_output=True, text=True, timeout=60)  # fmt: skip

    assert aborted.returncode == 0, aborted.stderr
    assert aborted.stdout == f"{MODEL}: no canary to abort\n"  # it read the release record
    loaded = set(json.loads(aborted.stderr.strip().splitlines()[-1]))
    assert {"serving.control.lifecycle", "serving.platforms.local.releases"} <= loaded
    leaked = sorted(name for name in loaded for heavy in NEVER_IMPORTED
                    if name == heavy or name.startswith(f"{heavy}."))  # fmt: skip
    assert leaked == []
