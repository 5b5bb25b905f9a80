"""The schedulable requests in policy order, kept sorted as they change (no per-step sort of the pool).

Sorting the whole pool every step costs O(n log n) Python key calls: 0.57 ms at
1,000 pooled requests. A request's policy key only changes when it is scheduled
(its remaining cost drops), so the queue keeps a `SortedKeyList` and the scheduler
re-inserts just the requests a step picked: a step touches O(batch * log n) entries. For the
starvation guard it also keeps requests by time since their last step (an ordered
dict, moved to the end when scheduled), so the starved ones are a prefix of it.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Iterator

from sortedcontainers import SortedKeyList

from engine.policies import SchedulingPolicy
from engine.request import RequestMeta


class RunQueue:
    def __init__(self, policy: SchedulingPolicy) -> None:
        self.policy = policy
        self._by_priority = SortedKeyList(key=policy.priority)
        self._by_wait: OrderedDict[str, RequestMeta] = OrderedDict()  # least recently stepped first

    def __len__(self) -> int:
        return len(self._by_wait)

    def __contains__(self, meta: RequestMeta) -> bool:
        return meta.request_id in self._by_wait

    def add(self, meta: RequestMeta) -> None:
        """Queue a request (again, after its counters changed: discard it first, then add it)."""
        self._by_priority.add(meta)
        self._by_wait[meta.request_id] = meta

    def discard(self, meta: RequestMeta) -> None:
        if self._by_wait.pop(meta.request_id, None) is not None:
            self._by_priority.remove(meta)

    def in_order(self, now: float) -> Iterator[RequestMeta]:
        """Requests in run order: starved ones first (oldest wait first), then by policy priority."""
        timeout = self.policy.starvation_timeout_s
        starved: list[RequestMeta] = []
        if timeout is not None:
            for meta in self._by_wait.values():
                if now - _waiting_since(meta) < timeout:
                    break
                starved.append(meta)
        yield from starved
        skip = {meta.request_id for meta in starved}
        for meta in self._by_priority:
            if meta.request_id not in skip:
                yield meta



def _waiting_since(meta: RequestMeta) -> float:
    return meta.last_scheduled_time if meta.last_scheduled_time is not None else meta.arrival_time
