"""Secret values masked out of text that leaves a process: engine and compile output, the error
messages built from it, and the prompts and answers the router shows of shadow traffic."""

from __future__ import annotations

import re
from collections.abc import Iterable

REDACTED = "[REDACTED]"
# The supervisor hands the release's API key to the engine in this variable.
API_KEY_ENV = "ROLLOUT_API_KEY"
# Environment variables whose values are secrets wherever they appear in engine output.
SECRET_ENV_VARS = (API_KEY_ENV, "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")


class Redactor:
    """Masks known secret values in text: engine output can echo its config or environment."""

    def __init__(self, secrets: Iterable[str | None]) -> None:
        # Longest first, so a secret that contains another is masked whole.
        self._secrets = sorted({secret for secret in secrets if secret}, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, REDACTED)
        return text


def secrets_in_env(env: dict[str, str]) -> list[str]:
    return [env[name] for name in SECRET_ENV_VARS if env.get(name)]


# Shapes of credentials a user may paste into a prompt, masked in text the router shows (shadow
# disagreements) although it never knew their values: OpenAI-style keys, Hugging Face, GitHub
# and AWS tokens, JWTs, and whatever follows "Bearer".
CREDENTIAL_SHAPES = re.compile(
    r"\b(?:sk-[A-Za-z0-9_-]{16,}|hf_[A-Za-z0-9]{20,}|gh[pousr]_[A-Za-z0-9]{20,}"
    r"|AKIA[0-9A-Z]{16}|eyJ[\w-]{8,}\.[\w-]{8,}\.[\w-]{8,})"
    r"|(?i:bearer)\s+[\w.~+/-]{8,}=*"
)


def mask_credentials(text: str) -> str:
    return CREDENTIAL_SHAPES.sub(REDACTED, text)
