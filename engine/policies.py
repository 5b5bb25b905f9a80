"""Scheduling policies: which pooled requests run in the next denoising step.

A policy only ranks requests (`priority`, smaller runs first); the run queue keeps
the pool in that order, starved requests first when `starvation_timeout_s` is set,
and the step scheduler fills the step budget in that order. New policies subclass
`SchedulingPolicy` and register in `POLICIES`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

from engine.request import RequestMeta


class SchedulingPolicy(ABC):
    name: ClassVar[str]

    def __init__(self, starvation_timeout_s: float | None = None) -> None:
        self.starvation_timeout_s = starvation_timeout_s

    @abstractmethod
    def priority(self, request: RequestMeta) -> tuple:
        """Sort key: smaller runs first."""

    @abstractmethod
    def decode_priority(self, arrival_time: float, decode_cost: float) -> tuple:
        """Sort key of a finished request in the VAE decoder's queue (the job's last stage): smaller decodes first.
        `decode_cost` is any measure that grows with the decode's time (seconds, latent elements)."""


class FIFOPolicy(SchedulingPolicy):
    """First come, first served (by arrival)."""

    name = "fifo"

    def priority(self, request: RequestMeta) -> tuple:
        return (request.arrival_time,)

    def decode_priority(self, arrival_time: float, decode_cost: float) -> tuple:
        return (arrival_time,)


class SRPTFPolicy(SchedulingPolicy):
    """Shortest remaining processing time first: L = remaining steps x sequence length.

    A request with a step cache counts only its steps that will compute (`remaining_cost`).

    Without a starvation timeout a long request can wait forever while shorter ones
    keep arriving; set `starvation_timeout_s` to bound its wait.
    """

    name = "srptf"

    def priority(self, request: RequestMeta) -> tuple:
        return (request.remaining_cost, request.arrival_time)

    def decode_priority(self, arrival_time: float, decode_cost: float) -> tuple:
        return (decode_cost, arrival_time)  # the remaining work of a finished request is its decode


POLICIES: dict[str, type[SchedulingPolicy]] = {p.name: p for p in (FIFOPolicy, SRPTFPolicy)}


def make_policy(name: str, starvation_timeout_s: float | None = None) -> SchedulingPolicy:
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; known: {sorted(POLICIES)}")
    return POLICIES[name](starvation_timeout_s)
