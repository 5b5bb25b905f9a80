"""Optional API keys of the video API: bearer tokens from a file or an environment variable.

Each key has a name, which owns the jobs created with it: a job is visible only to its
owner (404 to any other key, as if it did not exist). Tokens are compared in constant
time against every configured key. Without keys configured the API is open and every
job belongs to the owner ''.

Key sources (`AuthConfig`): a file of `name:token` lines (`#` comments allowed), and/or
an environment variable holding `name:token` pairs separated by commas.
"""

from __future__ import annotations

import hmac
import os
from pathlib import Path

from api.config import AuthConfig
from deployments.errors import Unauthorized


def _pairs(text: str, separator: str, source: str) -> dict[str, str]:
    keys = {}
    for entry in text.split(separator):
        entry = entry.strip()
        if not entry or entry.startswith("#"):
            continue
        name, colon, token = entry.partition(":")
        if not colon or not name.strip() or not token.strip():
            raise ValueError(f"{source}: expected name:token, got {entry[:20]!r}...")
        keys[name.strip()] = token.strip()
    return keys


class ApiKeys:
    def __init__(self, config: AuthConfig) -> None:
        self.tokens: dict[str, bytes] = {}  # name -> token
        if config.keys_file:
            file_keys = _pairs(Path(config.keys_file).read_text(), "\n", config.keys_file)
            self.tokens.update({n: t.encode() for n, t in file_keys.items()})
        if config.keys_env and os.environ.get(config.keys_env):
            env_keys = _pairs(os.environ[config.keys_env], ",", f"${config.keys_env}")
            self.tokens.update({n: t.encode() for n, t in env_keys.items()})
        if (config.keys_file or config.keys_env) and not self.tokens:
            raise ValueError("auth is configured but no API key was found in its file or environment variable")

    @property
    def enabled(self) -> bool:
        return bool(self.tokens)

    def owner(self, authorization: str | None) -> str:
        """The name of the key in an `Authorization: Bearer <token>` header ('' when keys are off)."""
        if not self.enabled:
            return ""
        scheme, _, token = (authorization or "").partition(" ")
        given = token.strip().encode()
        match = ""
        for name, expected in self.tokens.items():  # every key compared, whichever matches
            if hmac.compare_digest(given, expected) and scheme.lower() == "bearer":
                match = name
        if not match:
            raise Unauthorized("missing or invalid API key: send Authorization: Bearer <key>")
        return match
