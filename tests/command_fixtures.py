"""What the SGLang command-line tests share: the GPU profiles and the mount paths of a release."""

from __future__ import annotations

from pathlib import PurePosixPath

from serving.config.loader import available_models, load_profile

WEIGHTS = PurePosixPath("/weights/org/model/" + "a" * 40)
DEEPGEMM = PurePosixPath("/deepgemm/sm_100")
SGLANG_MODELS = [name for name in available_models() if load_profile(name).engine.kind == "sglang"]
