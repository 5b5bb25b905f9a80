"""Run one function on N local processes joined in a torch.distributed group (gloo on CPU).

Tests and benchmarks use it to exercise ring/Brick attention without a cluster:
`run_spmd(4, fn, payload)` calls `fn(rank, world_size, payload)` in 4 spawned
processes after `init_process_group`, and returns the per-rank results in rank order.
`fn` must be importable (a module-level function) and return picklable values.
"""

from __future__ import annotations

import io
import os
import socket
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

INIT_FAILED = "init_process_group failed:\n"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (process-group rendezvous, local servers)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _GroupNotFormed(RuntimeError):
    """Every failing rank failed to join the process group: worth a retry on a new port."""



def _entry(rank: int, world_size: int, port: int, backend: str, threads: int, fn: Callable, payload: Any,
           results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    try:
        try:
            dist.init_process_group(backend, rank=rank, world_size=world_size)
        except Exception:
            results.put((rank, None, INIT_FAILED + traceback.format_exc()))
            return
        try:
            # Serialised here: a tensor sent as a shared-memory handle would die with this process.
            buffer = io.BytesIO()
            torch.save(fn(rank, world_size, payload), buffer)
            results.put((rank, buffer.getvalue(), None))
        finally:
            dist.destroy_process_group()
    except BaseException:  # report to the parent instead of dying silently
        results.put((rank, None, traceback.format_exc()))


def run_spmd(world_size: int, fn: Callable[[int, int, Any], Any], payload: Any = None, backend: str = "gloo",
             threads_per_rank: int = 1, timeout_s: float = 300, attempts: int = 3) -> list[Any]:
    """Results of `fn` per rank. A group that fails to form (e.g. the probed port was taken
    before rank 0 bound it) is retried on a new port; errors inside `fn` are raised at once."""
    for attempt in range(attempts):
        try:
            return _run_once(world_size, fn, payload, backend, threads_per_rank, timeout_s)
        except _GroupNotFormed:
            if attempt + 1 == attempts:
                raise
    raise AssertionError("unreachable")



def _run_once(world_size, fn, payload, backend, threads_per_rank, timeout_s) -> list[Any]:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world_size, port, backend, threads_per_rank, fn, payload, results))
             for r in range(world_size)]
    for p in procs:
        p.start()
    try:
        collected = dict((rank, (value, error)) for rank, value, error in
                         (results.get(timeout=timeout_s) for _ in range(world_size)))
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    errors = [f"rank {r}:\n{e}" for r, (_, e) in sorted(collected.items()) if e]
    if errors and all(INIT_FAILED in e for e in errors):
        raise _GroupNotFormed("\n".join(errors))
    if errors:
        raise RuntimeError("SPMD run failed\n" + "\n".join(errors))
    return [torch.load(io.BytesIO(collected[r][0]), weights_only=False) for r in range(world_size)]
