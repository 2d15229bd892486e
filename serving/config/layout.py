"""Where things live on the volumes, the same on Modal (mounts) and locally (directories).

Weights:  <weights root>/<org>/<name>/<40-hex revision>/   one directory per revision, so files
          deleted upstream never linger and an old revision stays servable during a canary.
          <weights root>/.dummy/<org>/<name>/<40-hex revision>/  config and tokenizer only,
          for dummy weights: never taken for a download.
DeepGEMM: <deepgemm root>/<architecture>/                  an H200 cache never serves a B200.
          <deepgemm root>/<architecture>/models/<org>/<name>/<sha>/  config only, for compiling
"""

from __future__ import annotations

from pathlib import PurePath, PurePosixPath
from typing import TypeVar

from serving.config.profile import Profile, is_commit_sha

# Mount points inside Modal containers.
WEIGHTS_MOUNT = PurePosixPath("/weights")
DEEPGEMM_MOUNT = PurePosixPath("/deepgemm")

# Written last, after verification: its presence means "this revision is complete and proven".
SENTINEL_NAME = ".rollout-manifest.json"
DUMMY_DIR = ".dummy"

# A local Path or a container PurePosixPath: the layout is the same.
P = TypeVar("P", bound=PurePath)


def weights_dir(root: P, profile: Profile, revision: str) -> P:
    if not is_commit_sha(revision):
        raise ValueError(f"weights are stored per resolved commit, not per ref ({revision!r})")
    return root / profile.hub.repo / revision


def dummy_weights_dir(root: P, profile: Profile, revision: str) -> P:
    return weights_dir(root / DUMMY_DIR, profile, revision)


def deepgemm_dir(root: P, profile: Profile) -> P:
    architecture = profile.resources.architecture
    if architecture is None:
        raise ValueError(f"{profile.name} runs on the CPU and has no DeepGEMM cache")
    return root / architecture


def compile_model_dir(deepgemm_root: P, profile: Profile, revision: str) -> P:
    """config.json (+ remote code) of a revision, where the compile can read it before the
    weights are complete; it runs with dummy weights."""
    if not is_commit_sha(revision):
        raise ValueError(f"compiles are keyed per resolved commit, not per ref ({revision!r})")
    return deepgemm_dir(deepgemm_root, profile) / "models" / profile.hub.repo / revision
