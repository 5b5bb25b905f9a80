"""The DiT worker group of one step-scheduler replica: N rank actors, one torch.distributed group.

Each rank is a Ray actor holding an `engine.runner.ModelRunner` over the same
models; the ranks form one process group (gloo on CPU, NCCL on GPU) and run every
`StepPlan` together: each computes its Brick shards, attention inside each ring is
ring attention, and the outputs are all-gathered inside the group, so every rank
keeps the same (replicated) request state and no tensor leaves the group per step.

The group belongs to exactly one scheduler replica (no load balancer in front of
stateful ranks): the ranks are created by the replica, in its placement group
(bundle i holds rank i; the replica itself sits in bundle 0), and die with it.
A rank that dies fails the step on every rank; `WorkerGroup.recover()` then kills
the survivors and forms a new group on new actors, and the scheduler restarts the
lost requests from step 0 (same seeds, same results).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from dataclasses import replace
from datetime import timedelta

import ray
import torch
import torch.distributed as dist
from ray.util.placement_group import get_current_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from api.config import DeploymentResources, WorkerGroupConfig
from deployments import init_replica
from engine.engine import Executed
from engine.messages import StepPlan, VideoStepResult
from engine.runner import ModelRunner
from models import load_adapter
from models.spec import ModelSpec

logger = logging.getLogger(__name__)


class RankWorker:
    """One rank: a model runner in a process group with the other ranks of its group."""

    def __init__(self, models: list[ModelSpec], config: WorkerGroupConfig, rank: int) -> None:
        self.config = config
        init_replica(DeploymentResources(torch_threads=config.torch_threads, device=config.device))
        if self.config.device == "cpu" and torch.get_num_threads() > max(1, self.config.num_cpus_per_rank):
            logger.warning("rank %d runs %d torch threads on %.2f CPUs: on shared cores OpenMP threads wait on "
                           "each other and steps slow down several times; lower worker_group.torch_threads",
                           rank, torch.get_num_threads(), self.config.num_cpus_per_rank)
        self.rank = rank
        self.specs = models
        self.runner: ModelRunner | None = None

    def address(self) -> tuple[str, int]:
        """Where rank 0 listens for the group's rendezvous (this node's IP, a free port)."""
        ip = ray.util.get_node_ip_address()
        with socket.socket() as s:
            s.bind((ip, 0))
            return ip, s.getsockname()[1]

    def join(self, master: tuple[str, int]) -> int:
        """Join the process group and load the models; returns this process's pid (tests kill it)."""
        c = self.config
        device = torch.device(c.device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(c.backend, init_method=f"tcp://{master[0]}:{master[1]}", rank=self.rank,
                                world_size=c.ranks, timeout=timedelta(seconds=c.timeout_s))
        dist.barrier()  # every rank is in: the first P2P batch (NCCL's lazy communicator init) involves all ranks
        adapters = {s.name: load_adapter(s, parts=("transformer",), device=c.device) for s in self.specs}
        self.runner = ModelRunner(adapters, self.rank, c.ranks)
        return os.getpid()

    def held(self) -> int:
        """Requests whose latents and samplers this rank holds."""
        return len(self.runner.requests) if self.runner is not None else 0

    def execute(self, plan: StepPlan) -> VideoStepResult:
        assert self.runner is not None, "join() first"
        result = self.runner.execute(plan)
        # Every rank holds the same final latents: one copy travels.
        return result if self.rank == 0 else replace(result, finished={})


class WorkerGroup:
    """The replica's handle on its ranks and the engine's executor (`engine.engine.Executor`): start, run a plan on
    all of them, rebuild after a fault."""

    pipeline_depth = 2
    """The running plan and the next one, already planned: the ranks start it as soon as they end the last."""

    def __init__(self, models: list[ModelSpec], config: WorkerGroupConfig) -> None:
        self.models, self.config = models, config
        self.generation = 0  # rebuilds so far
        self.ranks: list[ray.actor.ActorHandle] = []
        self.pids: list[int] = []

    async def start(self) -> None:
        c = self.config
        placement = get_current_placement_group()
        actor = ray.remote(RankWorker)
        self.ranks = [actor.options(
            num_cpus=c.num_cpus_per_rank, num_gpus=c.num_gpus_per_rank, max_concurrency=1,
            scheduling_strategy=PlacementGroupSchedulingStrategy(placement, placement_group_bundle_index=rank)
            if placement is not None else None,
        ).remote(self.models, c, rank) for rank in range(c.ranks)]
        master = await self.ranks[0].address.remote()
        self.pids = await asyncio.gather(*(r.join.remote(master) for r in self.ranks))
        logger.info("worker group %d up: %d ranks, pids %s", self.generation, c.ranks, self.pids)

    async def execute(self, plan: StepPlan) -> Executed:
        """Run one plan on every rank: rank 0's result with the group's ring bytes, and each rank's busy seconds.
        Raises if any rank failed: the engine then calls `recover`."""
        ref = ray.put(plan)  # serialised once for all ranks
        results: list[VideoStepResult] = await asyncio.gather(*(r.execute.remote(ref) for r in self.ranks))
        merged = replace(results[0], ring_bytes=sum(r.ring_bytes for r in results))
        return Executed(merged, tuple(r.forward_seconds for r in results))

    async def held(self) -> list[int]:
        """Requests each rank holds (between steps: a rank runs one call at a time)."""
        return list(await asyncio.gather(*(r.held.remote() for r in self.ranks)))

    async def recover(self, reason: str) -> bool:
        """Kill every rank (survivors sit in a broken group) and form a new group: every request's state is gone."""
        start = time.perf_counter()
        for rank in self.ranks:
            ray.kill(rank, no_restart=True)
        self.generation += 1
        await self.start()
        logger.warning("worker group rebuilt in %.1f s after: %s", time.perf_counter() - start, reason)
        return True
