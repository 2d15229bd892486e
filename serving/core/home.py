"""Where things live on the orchestration host: the repository and the local target's home."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
HOME_ENV = "ROLLOUT_HOME"
DEFAULT_HOME = REPO_ROOT / ".rollout"


def rollout_home() -> Path:
    """Where the local target keeps everything: ROLLOUT_HOME, else .rollout in the repo."""
    return Path(os.environ.get(HOME_ENV) or DEFAULT_HOME)


def repo_pythonpath() -> str:
    """The repository first, so `python -m serving...` works from any working directory."""
    existing = os.environ.get("PYTHONPATH")
    return f"{REPO_ROOT}{os.pathsep}{existing}" if existing else str(REPO_ROOT)
