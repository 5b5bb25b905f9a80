"""What an overloaded ingress tells the client from how fast a scheduler's pool drains.

Both step schedulers (video and diffusion LM) measure token-steps per second over the
steps they run (`engine.step_cost.DrainRate`); their ingresses divide the pool's
remaining work by that rate to give a 429 a `Retry-After` and a queued job its
estimated start, rather than a constant.
"""

from __future__ import annotations

import math

from deployments.errors import Overloaded

MAX_RETRY_AFTER_S = 3600


def drain_seconds(load: dict) -> float | None:
    """The pool's remaining work over its measured rate (None before any step)."""
    rate = load["token_steps_per_second"]
    return None if not rate else load["remaining_token_steps"] / rate


def overloaded(message: str, drain_s: float | None) -> Overloaded:
    """A 429 whose message says when the pool's work drains and whose Retry-After is that, within 1 s-1 h."""
    if drain_s is None:
        return Overloaded(f"{message}; retry later")
    return Overloaded(f"{message}; the pool's work drains in about {drain_s:.0f} s; retry later",
                      min(MAX_RETRY_AFTER_S, max(1, math.ceil(drain_s))))
