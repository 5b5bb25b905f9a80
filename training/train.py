"""GRPO+ run on Ray: driver, rollout actor, reward actors, and a Ray Train `TorchTrainer`.

    python -m training.train --config configs/train/tiny-cpu.yaml [--steps N] [--resume CHECKPOINT_DIR]

The driver starts the rollout actor (`training.rollout`), the reward actors, and a
`TorchTrainer` (`trainer_workers` workers, each holding an FSDP2 shard of the policy,
`training/fsdp.py`: gloo on CPU, NCCL on GPU; rank 0 drives the actors) whose loop
does, per step k:

    batch_k  <- wait for the rollout of step k (sampled, rewards computed as chunks arrived)
    one_off: submit the rollout of step k+1 now, with the current (version k) weights
    train on batch_k: old log-probs, group advantages, GRPO+ loss, mini-batch updates
    export weights (version k+1) -> rollout.load_weights (queued after the in-flight rollout)
    sync:    submit the rollout of step k+1 only now

so with one-off pipelining a batch is sampled by weights at most one step old
(logged as staleness), and the trainer never waits for sampling it could overlap.
The maximum response length follows `context_schedule` by step. Checkpoints hold
the sharded model and optimiser (loadable on any worker count), the full model in HF
format, the step, the data position and the schedule in force.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import ray
import torch
import torch.distributed as dist

from training.config import TrainConfig, load_config
from training.fsdp import full_weights, load_sharded, save_sharded, shard_policy
from training.learner import grpo_update
from training.problems import Problem, read_jsonl

STATE_FILE = "trainer_state.json"


def _problems(source: str | None, held_out: bool) -> list[Problem]:
    from training import toy_tasks

    if source is None:
        return []
    if source == "toy":
        return toy_tasks.held_out_problems() if held_out else toy_tasks.train_problems()
    return read_jsonl(Path(source))


class ProblemStream:
    """Shuffled epochs over the training problems; its position is part of a checkpoint."""

    def __init__(self, problems: list[Problem], batch: int, seed: int, epoch: int = 0, index: int = 0) -> None:
        self.problems, self.batch, self.seed, self.epoch, self.index = problems, batch, seed, epoch, index

    def _order(self) -> list[int]:
        order = list(range(len(self.problems)))
        random.Random(self.seed + self.epoch).shuffle(order)
        return order

    def next(self) -> list[Problem]:
        out, order = [], self._order()
        while len(out) < self.batch:
            if self.index >= len(self.problems):
                self.epoch, self.index = self.epoch + 1, 0
                order = self._order()
            out.append(self.problems[order[self.index]])
            self.index += 1
        return out

    def position(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}


def _generate(rollout, problems: list[Problem], cfg: TrainConfig, step: int, chunk_problems: int, rewarders):
    """The rollout of `problems` with step `step`'s response limit and the configured sampling."""
    return rollout.generate.remote(problems, cfg.rollout.group_size, cfg.max_response_tokens(step),
                                   cfg.rollout.temperature, cfg.rollout.top_p, chunk_problems, rewarders)


def _submit(rollout, stream: ProblemStream, cfg: TrainConfig, step: int, rewarders):
    return _generate(rollout, stream.next(), cfg, step, cfg.rollout.chunk_problems, rewarders)


def evaluate_held_out(rollout, problems: list[Problem], cfg: TrainConfig, rewarders, step: int) -> float:
    """Mean reward of the held-out problems (group_size samples each) with the rollout engine's weights."""
    batch = ray.get(_generate(rollout, problems, cfg, step, len(problems), rewarders))
    return sum(r.reward for r in ray.get(batch.reward_refs)) / len(batch.samples)


def _broadcast(value):
    """Rank 0's `value` on every worker (the batch: only rank 0 talks to the rollout and reward actors)."""
    if dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _export(policy, directory: Path) -> str | None:
    """Gather the full weights (every worker takes part) and write them in HF format on rank 0; its path there."""
    weights = full_weights(policy.model)
    return str(policy.save(directory, weights)) if dist.get_rank() == 0 else None


def train_loop(loop_config: dict) -> None:
    """Runs on every Ray Train worker: the whole pipelined GRPO+ loop. Rank 0 drives the rollouts, rewards, logs
    and weight syncs; every worker holds an FSDP shard of the policy and trains on its part of each batch."""
    import ray.train
    import ray.train.torch

    from training.metrics import TrainingMetrics
    from training.policy import Policy

    cfg = TrainConfig.model_validate(loop_config["config"])
    lead = ray.train.get_context().get_world_rank() == 0
    gauges = TrainingMetrics(cfg.name) if lead else None
    rollout, rewarders = loop_config["rollout"], loop_config["rewarders"]
    torch.manual_seed(cfg.data.seed)
    # A restarted worker of this run resumes from the run's latest checkpoint; a new run may
    # start from an earlier run's checkpoint (Ray Train v2 passes it through the loop config).
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and loop_config.get("resume_from"):
        checkpoint = ray.train.Checkpoint(loop_config["resume_from"])
    work = Path(tempfile.mkdtemp(prefix="grpo-"))
    policy = Policy(cfg.model.resolved())
    if cfg.trainer_use_gpu:
        policy.model.to(ray.train.torch.get_device())
    shard_policy(policy.model)
    optimizer = torch.optim.AdamW(policy.model.parameters(), lr=cfg.algorithm.lr)
    state = {"step": 0, "epoch": 0, "index": 0, "version": 0}
    if checkpoint:
        with checkpoint.as_directory() as ckpt:
            state = json.loads((Path(ckpt) / STATE_FILE).read_text())
            load_sharded(Path(ckpt) / "sharded", policy.model, optimizer)
    train = _problems(cfg.data.train, held_out=False)
    held_out = _problems(cfg.data.held_out, held_out=True)
    stream = ProblemStream(train, cfg.data.batch_problems, cfg.data.seed, state["epoch"], state["index"])

    if not checkpoint and cfg.warm_start.steps:
        demos = train
        if cfg.data.train == "toy" and cfg.warm_start.label_noise:
            from training.toy_tasks import noisy_demonstrations

            demos = noisy_demonstrations(train, cfg.warm_start.label_noise, cfg.data.seed)
        policy.warm_start(demos, cfg.warm_start.steps, cfg.warm_start.batch, cfg.warm_start.lr, cfg.data.seed)
    if checkpoint or cfg.warm_start.steps:  # the rollout engine starts from the base model's weights
        exported = _export(policy, work / "start")
        if lead:
            ray.get(rollout.load_weights.remote(exported, state["version"]))
    log = cfg.metrics_path()
    if lead:
        log.parent.mkdir(parents=True, exist_ok=True)
    if lead and held_out and not checkpoint:
        start = {"step": -1, "held_out_reward": evaluate_held_out(rollout, held_out, cfg, rewarders, 0)}
        log.write_text(json.dumps(start) + "\n")
        gauges.record(start)
        print(json.dumps(start), flush=True)

    version = state["version"]
    pending = _submit(rollout, stream, cfg, state["step"], rewarders) if lead else None
    sync = None
    for step in range(state["step"], cfg.steps):
        t0 = time.perf_counter()
        last = step + 1 == cfg.steps
        batch = rewards = t_sync = None
        if lead:
            batch = ray.get(pending)
            rewards = [r.reward for r in ray.get(batch.reward_refs)]
            # The previous step's weight sync (in one-off mode it ran right after this batch sampled).
            t_sync = ray.get(sync) if sync is not None else None
            if cfg.pipeline == "one_off" and not last:
                pending = _submit(rollout, stream, cfg, step + 1, rewarders)
        t_wait = time.perf_counter() - t0
        samples, rewards = _broadcast((batch.samples if lead else None, rewards))
        t1 = time.perf_counter()
        metrics = grpo_update(policy, optimizer, samples, rewards, cfg, seed=cfg.data.seed + step)
        t_train = time.perf_counter() - t1
        version += 1
        exported = _export(policy, work / f"v{version}")
        if lead:
            shutil.rmtree(work / f"v{version - 2}", ignore_errors=True)  # the actor may still read v{version-1}
            sync = rollout.load_weights.remote(exported, version)
            if cfg.pipeline == "sync" or last:
                t_sync, sync = ray.get(sync), None
            if cfg.pipeline == "sync" and not last:
                pending = _submit(rollout, stream, cfg, step + 1, rewarders)
            metrics.update({
                "step": step, "mean_reward": sum(rewards) / len(rewards),
                "response_tokens": sum(len(s.response_ids) for s in samples) / len(samples),
                "max_response_tokens": batch.max_tokens, "staleness": step - batch.weights_version,
                "generate_s": batch.generate_seconds, "wait_rollout_s": t_wait, "train_s": t_train,
                "weight_sync_s": t_sync, "step_s": time.perf_counter() - t0,
            })
            if last and held_out:
                metrics["held_out_reward"] = evaluate_held_out(rollout, held_out, cfg, rewarders, step)
            with log.open("a") as f:
                f.write(json.dumps(metrics) + "\n")
            gauges.record(metrics)
            print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}), flush=True)
        state = {"step": step + 1, **stream.position(), "version": version,
                 "max_response_tokens": cfg.max_response_tokens(step + 1)}
        if (step + 1) % cfg.checkpoint_every == 0 or last:
            _checkpoint(work / f"checkpoint-{step + 1}", policy, optimizer, state, metrics, exported)
        else:
            ray.train.report(metrics)
    shutil.rmtree(work, ignore_errors=True)


def _checkpoint(ckpt: Path, policy, optimizer, state: dict, metrics: dict, exported: str | None) -> None:
    """Every worker writes its shards (`sharded/`, loadable on any worker count) and reports its directory; Ray
    Train merges them into one checkpoint. Rank 0 (which holds `exported`, this step's full weights in HF format)
    adds them as `model/` (servable as it is; hard links, not a second gather) and the loop state."""
    import ray.train

    save_sharded(ckpt / "sharded", policy.model, optimizer)
    if exported is not None:
        shutil.copytree(exported, ckpt / "model", copy_function=os.link)
        (ckpt / STATE_FILE).write_text(json.dumps(state))
    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(ckpt)))
    shutil.rmtree(ckpt, ignore_errors=True)


def run(cfg: TrainConfig, resume: str | None = None):
    """Start the actors and the TorchTrainer; returns Ray Train's `Result` (metrics, checkpoints)."""
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from training.rollout import LocalRollout, RewardActor, ServedRollout

    max_len = cfg.rollout.max_prompt_tokens + max(s.max_response_tokens for s in cfg.context_schedule)
    if cfg.rollout.backend == "local":
        rollout = LocalRollout.options(num_cpus=cfg.rollout_cpus,
                                       runtime_env={"env_vars": dict(cfg.rollout.env_vars)}).remote(
            cfg.model.resolved(), cfg.model.dtype, max_len, dict(cfg.rollout.engine_kwargs), cfg.data.seed)
    else:
        rollout = ray.remote(ServedRollout).options(num_cpus=0.1).remote(
            cfg.rollout.base_url, cfg.rollout.served_model, cfg.rollout.admin_token_env, cfg.model.resolved())
    rewarders = [RewardActor.options(num_cpus=0.1).remote(cfg.reward.timeout_s, cfg.reward.tests_per_problem)
                 for _ in range(cfg.reward.workers)]
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"config": cfg.model_dump(mode="json"), "rollout": rollout, "rewarders": rewarders,
                           "resume_from": resume},
        scaling_config=ScalingConfig(num_workers=cfg.trainer_workers, use_gpu=cfg.trainer_use_gpu,
                                     resources_per_worker={"CPU": cfg.trainer_cpus, **cfg.trainer_resources}),
        run_config=RunConfig(name=cfg.name, storage_path=cfg.storage(),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    return trainer.fit()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--pipeline", choices=["one_off", "sync"])
    parser.add_argument("--resume", help="checkpoint directory of an earlier run")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, steps=args.steps, pipeline=args.pipeline)
    ray.init(include_dashboard=False, ignore_reinit_error=True)
    result = run(cfg, args.resume)
    print(f"metrics: {cfg.metrics_path()}")
    print(f"checkpoint: {result.checkpoint.path if result.checkpoint else None}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
