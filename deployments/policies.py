"""Scheduling policies: which pooled requests run in the next denoising step.

A policy only orders the pool; the step scheduler then fills the step budget in
that order. New policies subclass `SchedulingPolicy` and register in `POLICIES`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, Iterable

from deployments.request import RequestState


class SchedulingPolicy(ABC):
    name: ClassVar[str]

    def __init__(self, starvation_timeout_s: float | None = None) -> None:
        self.starvation_timeout_s = starvation_timeout_s

    @abstractmethod
    def priority(self, request: RequestState) -> tuple:
        """Sort key: smaller runs first."""

    def order(self, pool: Iterable[RequestState], now: float) -> list[RequestState]:
        """Pool in run order. Starved requests (not stepped for `starvation_timeout_s`) go first, oldest first."""
        timeout = self.starvation_timeout_s
        if timeout is None:
            return sorted(pool, key=self.priority)

        def key(r: RequestState) -> tuple:
            since = r.last_scheduled_time if r.last_scheduled_time is not None else r.arrival_time
            starved = now - since >= timeout
            return (0, since) if starved else (1, *self.priority(r))

        return sorted(pool, key=key)


class FIFOPolicy(SchedulingPolicy):
    """First come, first served (by arrival)."""

    name = "fifo"

    def priority(self, request: RequestState) -> tuple:
        return (request.arrival_time,)


class SRPTFPolicy(SchedulingPolicy):
    """Shortest remaining processing time first: L = remaining steps x sequence length.

    Without a starvation timeout a long request can wait forever while shorter ones
    keep arriving; set `starvation_timeout_s` to bound its wait.
    """

    name = "srptf"

    def priority(self, request: RequestState) -> tuple:
        return (request.remaining_cost, request.arrival_time)


POLICIES: dict[str, type[SchedulingPolicy]] = {p.name: p for p in (FIFOPolicy, SRPTFPolicy)}


def make_policy(name: str, starvation_timeout_s: float | None = None) -> SchedulingPolicy:
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; known: {sorted(POLICIES)}")
    return POLICIES[name](starvation_timeout_s)
