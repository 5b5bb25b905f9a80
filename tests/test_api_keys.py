"""API keys: parsed from a file and an environment variable; a bearer token maps to its key's name, or 401."""

from __future__ import annotations

import pytest

from api.config import AuthConfig
from deployments.api_keys import ApiKeys
from deployments.errors import Unauthorized


def test_keys_from_file_and_env_name_their_owner(tmp_path, monkeypatch):
    keys_file = tmp_path / "keys"
    keys_file.write_text("# team keys\nalice: a-secret\n\nbob:b-secret\n")
    monkeypatch.setenv("EXTRA_KEYS", "carol:c-secret, dave:d-secret")
    keys = ApiKeys(AuthConfig(keys_file=str(keys_file), keys_env="EXTRA_KEYS"))
    assert keys.owner("Bearer a-secret") == "alice" and keys.owner("bearer d-secret") == "dave"
    for header in (None, "", "Bearer", "Bearer wrong", "Basic a-secret", "Bearer a-secre"):
        with pytest.raises(Unauthorized):
            keys.owner(header)


def test_without_keys_the_api_is_open():
    assert ApiKeys(AuthConfig()).owner(None) == ""


def test_bad_key_sources_are_refused_clearly(tmp_path, monkeypatch):
    bad = tmp_path / "keys"
    bad.write_text("just-a-token\n")
    with pytest.raises(ValueError, match="expected name:token"):
        ApiKeys(AuthConfig(keys_file=str(bad)))
    monkeypatch.delenv("NO_SUCH_KEYS", raising=False)
    with pytest.raises(ValueError, match="no API key was found"):
        ApiKeys(AuthConfig(keys_env="NO_SUCH_KEYS"))
