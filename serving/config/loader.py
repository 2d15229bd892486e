"""Profiles from models/*.yaml: parsed, validated and checked against SGLang's flag table, with
one-line errors.

Two ways in. `load_profile` checks everything: what prepares, plans or starts an engine uses it.
`read_profile` leaves the engine's flags out: a rollback (`rollout abort`) or a `status` starts
no engine, and must still work while a flag the operator just mistyped waits for its fix."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from serving.config.flags import check_flags
from serving.config.profile import Profile, ProfileError

# The repo's own `models/` directory; ROLLOUT_MODELS_DIR points elsewhere (tests, containers).
DEFAULT_MODELS_DIR = Path(__file__).resolve().parents[2] / "models"


def models_dir() -> Path:
    return Path(os.environ.get("ROLLOUT_MODELS_DIR", DEFAULT_MODELS_DIR))


def available_models(directory: Path | None = None) -> list[str]:
    return sorted(path.stem for path in (directory or models_dir()).glob("*.yaml"))


def load_profile(name: str, directory: Path | None = None) -> Profile:
    path = profile_path(name, directory)
    profile = parse_profile(path)
    try:
        check_flags(profile)
    except ValueError as exc:
        raise ProfileError(f"{path}: {exc}") from None
    return profile


def read_profile(name: str, directory: Path | None = None) -> Profile:
    return parse_profile(profile_path(name, directory))


def profile_path(name: str, directory: Path | None = None) -> Path:
    directory = directory or models_dir()
    path = directory / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(available_models(directory)) or "none"
        raise ProfileError(f"unknown model {name!r} (profiles in {directory}: {known})")
    return path


def parse_profile(path: Path) -> Profile:
    """The profile in `path`, validated, its engine flags not yet checked."""
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ProfileError(f"{path}:{where} invalid YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict):
        raise ProfileError(f"{path}: a profile is a mapping of fields")
    if data.get("name") != path.stem:
        raise ProfileError(f"{path}: name: must be {path.stem!r}, the file's name")
    try:
        if "probes" in data:
            data["probes"] = _resolve_named(
                data["probes"], "probes", "probes", path.parent, named=True
            )
        canary = data.get("canary")
        if isinstance(canary, dict) and "golden_prompts" in canary:
            canary["golden_prompts"] = _resolve_named(
                canary["golden_prompts"],
                "canary.golden_prompts",
                "golden",
                path.parent,
                named=False,
            )
    except ValueError as exc:
        raise ProfileError(f"{path}: {exc}") from None
    try:
        profile = Profile.model_validate(data)
    except ValidationError as exc:
        raise ProfileError(f"{path}: {_first_error(exc)}") from None
    return profile


def _resolve_named(
    entries: Any, field: str, library: str, directory: Path, *, named: bool
) -> Any:
    """Replace names in a list by their definitions in models/shared/<library>.yaml, so the
    standard probes and golden prompts are written once, not copied into every profile."""
    if not isinstance(entries, list) or not any(isinstance(entry, str) for entry in entries):
        return entries
    definitions = yaml.safe_load((directory / "shared" / f"{library}.yaml").read_text())
    resolved = []
    for index, entry in enumerate(entries):
        if isinstance(entry, str):
            if entry not in definitions:
                known = ", ".join(definitions)
                raise ValueError(f"{field}.{index}: no shared {library} {entry!r} ({known})")
            entry = {"name": entry, **definitions[entry]} if named else definitions[entry]
        resolved.append(entry)
    return resolved


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    field = ".".join(str(part) for part in error["loc"]) or "(top level)"
    message = error["msg"].removeprefix("Value error, ")
    return f"{field}: {message}"
