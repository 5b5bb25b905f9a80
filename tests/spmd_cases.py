"""Worker functions that tests run on spawned gloo ranks (they must be importable)."""

from __future__ import annotations

import torch

from attention.plan import BrickPlan
from attention.ring import CommStats, brick_attention


def rows_of(plan: BrickPlan, rank: int, per_request: list[torch.Tensor]) -> torch.Tensor:
    """This rank's packed rows: its shard of each request, in plan order."""
    parts = [per_request[s.assignment.request][s.assignment.bounds[s.position]:s.assignment.bounds[s.position + 1]]
             for s in plan.local_shards(rank)]
    return torch.cat(parts) if parts else per_request[0][:0]


def scatter_back(plan: BrickPlan, outputs: list[torch.Tensor], like: list[torch.Tensor]) -> list[torch.Tensor]:
    """Reassemble every request from the ranks' packed outputs."""
    full = [torch.full_like(t, float("nan")) for t in like]
    for rank, out in enumerate(outputs):
        for s in plan.local_shards(rank):
            a = s.assignment
            full[a.request][a.bounds[s.position]:a.bounds[s.position + 1]] = out[s.start:s.start + s.length]
    return full


def brick_cases(rank: int, world_size: int, cases: list) -> list[tuple[torch.Tensor, int]]:
    results = []
    for plan, q, k, v in cases:
        stats = CommStats()
        out = brick_attention(rows_of(plan, rank, q), rows_of(plan, rank, k), rows_of(plan, rank, v), plan, rank,
                              stats=stats)
        results.append((out, stats.bytes_sent))
    return results


def packed_forward_cases(rank: int, world_size: int, payload) -> list[dict]:
    """This rank's output rows of a sharded packed forward per plan: {request: (token_start, rows)}."""
    from attention.context import ShardedAttention
    from models import load_adapter
    from tests.conftest import tiny_spec

    family, requests, plans = payload
    adapter = load_adapter(tiny_spec(family), ["transformer"])  # seeded: the same weights in every process
    with torch.no_grad():
        return [adapter.packed_module.output_rows(adapter.transformer, requests, ShardedAttention(plan, rank))
                for plan in plans]


def engine_group_case(rank: int, world_size: int, payload) -> dict:
    """Scheduler core + this rank's model runner over a gloo group; every rank runs an identical core.

    Returns the final latents, the ring sizes the plans used, this rank's KV bytes sent, the errors, the
    forward counts of the steps and each request's steps that ran every block.
    """
    from attention.planner import BrickCostModel
    from deployments.text_encoder import EncodeRequest, TextEncoderCore
    from engine.config import BudgetConfig
    from engine.messages import NewRequest
    from engine.policies import make_policy
    from engine.runner import ModelRunner
    from engine.scheduler import StepSchedulerCore
    from models import load_adapter
    from tests.factories import noise_picture

    specs, asks, min_shard_tokens, bad = payload  # specs: tiny ModelSpecs (seeded: the same weights on every rank)
    core = StepSchedulerCore(make_policy("fifo"), BudgetConfig(), world_size=world_size,
                             cost_model=BrickCostModel(min_shard_tokens=min_shard_tokens, linear_tokens=0))
    runner = ModelRunner({s.name: load_adapter(s, ["transformer"]) for s in specs}, rank, world_size)
    config_only = {s.name: load_adapter(s, ()) for s in specs}
    encoders = {s.name: TextEncoderCore([s]) for s in specs}
    vaes = {s.name: load_adapter(s, ["vae"]) for s in specs if config_only[s.name].image_to_video}
    for request_id, spec in asks:
        prompt = encoders[spec.model].encode_batch([EncodeRequest(spec.model, spec.prompt, spec.negative_prompt)])[0]
        if spec.model in vaes:  # image-to-video: a noise picture drawn from the request's seed
            prompt = prompt.with_condition(vaes[spec.model].encode_image(noise_picture(spec.seed), spec.height,
                                                                         spec.width, spec.num_frames, spec.seed))
        if request_id in bad:  # an embedding width the transformer cannot take
            prompt.cond["encoder_hidden_states"] = torch.zeros(1, 16, 7)
        core.admit(NewRequest.from_spec(request_id, spec, prompt, config_only[spec.model]))
    latents, rings, ring_bytes, errors, forwards = {}, set(), 0, {}, set()
    computed_steps = {}
    while core.pool:
        plan = core.schedule()
        rings |= {a.size for p in plan.rings.values() for a in p.assignments}
        result = runner.execute(plan)
        core.postprocess(plan, result)
        latents.update(result.finished)
        ring_bytes += result.ring_bytes
        errors.update(result.errors)
        forwards.add(result.forwards)
        computed_steps.update((m.request_id, m.computed_steps) for m in core.pop_done())
    return {"latents": latents, "rings": rings, "ring_bytes": ring_bytes, "errors": errors, "forwards": forwards,
            "computed_steps": computed_steps}


def assert_two_ranks_equal_one_rank(specs: list, asks: list, min_shard_tokens: int) -> list[dict]:
    """`asks` ([(id, GenerationSpec)]) on one rank and on two gloo ranks: a ring of 2 ran and sent K/V, no request
    failed, and every rank's final latents equal one rank's (sharded sums in another order: 1e-4). The two ranks'
    results, for further checks."""
    from common.spmd import run_spmd

    payload = (specs, asks, min_shard_tokens, set())
    (alone,) = run_spmd(1, engine_group_case, payload)
    ranks = run_spmd(2, engine_group_case, payload)
    assert all(2 in r["rings"] and r["ring_bytes"] > 0 and not r["errors"] for r in ranks)
    for request_id, _ in asks:
        for r in ranks:
            torch.testing.assert_close(r["latents"][request_id], alone["latents"][request_id], atol=1e-4, rtol=1e-4)
    return ranks
