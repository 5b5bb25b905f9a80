"""The base of every validated config model: parsed once, never mutated, unknown keys refused."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class FrozenModel(BaseModel):
    """A pydantic model that is frozen after validation and rejects fields it does not declare."""

    model_config = ConfigDict(frozen=True, extra="forbid")
