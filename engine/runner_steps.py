"""The bookkeeping every model runner does around its forward (video `ModelRunner`, diffusion-LM `DllmRunner`).

A plan's new requests are admitted one by one so that a bad one fails alone, and the
plan's scheduled ids are matched with the state the runner holds: an id it does not
hold (lost in a worker restart) or whose step counter disagrees with the plan fails,
the rest go to the forward in packed order.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from engine.messages import StepPlan

logger = logging.getLogger(__name__)
State = TypeVar("State")


def admit_new(plan: StepPlan, admit: Callable[[Any], None]) -> dict[str, str]:
    """Call `admit` on each of the plan's new requests; returns the errors of those it refused."""
    errors: dict[str, str] = {}
    for new in plan.new_requests:
        try:
            admit(new)
        except Exception as exc:  # a bad request fails alone
            logger.exception("admitting %s failed", new.request_id)
            errors[new.request_id] = f"admission failed on the worker: {exc!r}"
    return errors


def scheduled_states(plan: StepPlan, errors: dict[str, str], held: Mapping[str, State],
                     step_of: Callable[[State], int]) -> list[State]:
    """The held state of each scheduled request, in packed order; unknown or out-of-step ones go to `errors`."""
    out = []
    for scheduled in plan.scheduled:
        if scheduled.request_id in errors:
            continue
        state = held.get(scheduled.request_id)
        if state is None:
            errors[scheduled.request_id] = "the worker holds no state for this request (lost in a worker restart)"
        elif step_of(state) != scheduled.step_index:
            errors[scheduled.request_id] = (f"step index mismatch: planned {scheduled.step_index}, "
                                            f"the worker is at {step_of(state)}")
        else:
            out.append(state)
    return out
