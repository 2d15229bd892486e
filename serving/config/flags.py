"""SGLang's option table (dumped from its own parser), and the check a profile's flags pass when
it loads: without importing SGLang or torch."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

from pydantic import BaseModel

from serving.config.profile import Profile

FLAG_TABLES = Path(__file__).parent / "sglang_flags"


class FlagSpec(BaseModel):
    takes_value: bool
    choices: list[str] | None = None


@cache
def flag_table(version: str) -> dict[str, FlagSpec]:
    path = FLAG_TABLES / f"{version}.json"
    if not path.is_file():
        raise ValueError(f"no SGLang {version} flag table ({path.name}); pin a supported version")
    options = json.loads(path.read_text())
    return {name: FlagSpec.model_validate(spec) for name, spec in options.items()}


def check_flags(profile: Profile) -> None:
    """Reject flags SGLang would reject, naming the profile field. No-op for other engines."""
    engine = profile.engine
    if engine.kind != "sglang":
        return
    table = flag_table(engine.version)
    for name, value in engine.flags.items():
        field = f"engine.flags.{name}"
        spec = table.get(f"--{name}")
        if spec is None:
            raise ValueError(f"{field}: SGLang {engine.version} has no flag --{name}")
        if not spec.takes_value and value is not True:
            raise ValueError(f"{field}: --{name} is a switch; write `true` or leave it out")
        if spec.takes_value and isinstance(value, bool):
            raise ValueError(f"{field}: --{name} takes a value, not {value}")
        if spec.choices is not None and str(value) not in spec.choices:
            raise ValueError(f"{field}: {value!r} is not one of {spec.choices}")
