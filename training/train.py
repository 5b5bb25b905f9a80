"""GRPO+ run on Ray: driver, rollout actor, reward actors, and a Ray Train `TorchTrainer`.

    python -m training.train --config configs/train/tiny-cpu.yaml [--steps N] [--resume CHECKPOINT_DIR]

The driver starts the rollout actor (`training.rollout`: a private vLLM engine, or the
coder / diffusion-LM Serve app users are talking to), the reward actors, and a `TorchTrainer`
(`trainer_workers` workers, each holding an FSDP2 shard of the policy,
`training/fsdp.py`: gloo on CPU, NCCL on GPU; rank 0 drives the actors) whose loop
does, per step k:

    batch_k  <- wait for the rollout of step k (sampled, rewards computed as groups arrived)
    one_off: submit the rollout of step k+1 now, with the current (version k) weights
    train on batch_k: old log-probs, group advantages, GRPO+ loss, mini-batch updates
    gather weights (version k+1) once -> object store (or a directory)
        -> rollout.load_weights (queued after the in-flight rollout)
    sync:    submit the rollout of step k+1 only now

so with one-off pipelining a batch is sampled by weights at most one step old
(logged as staleness), and the trainer never waits for sampling it could overlap.
The maximum response length follows `context_schedule` by step. Checkpoints hold
the sharded model and optimiser (loadable on any worker count), the full model in HF
format (Dream's layout for a diffusion policy), the step, the data position and the
schedule in force. `model.family: dllm` trains a masked-diffusion coder with coupled-GRPO
(`training.dllm_policy`, `training.coupled_grpo`) through the same loop.
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
from training.rollout import SyncTiming, WeightsHandoff

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


def make_policy(cfg: TrainConfig):
    """The trainer's policy of the configured family: a causal LM (`Policy`) or a diffusion LM (`DllmPolicy`, its
    warm start on the first context stage's canvas, its log-likelihoods from the configured mask estimator)."""
    if cfg.model.family == "dllm":
        from training.dllm_policy import DllmPolicy

        return DllmPolicy(cfg.model.resolved(), getattr(torch, cfg.model.dtype), cfg.algorithm.estimator,
                          cfg.algorithm.mask_pairs, cfg.algorithm.mask_ratio_low, cfg.max_response_tokens(0))
    from training.policy import Policy

    return Policy(cfg.model.resolved())


def _broadcast(value):
    """Rank 0's `value` on every worker (the batch: only rank 0 talks to the rollout and reward actors)."""
    if dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _publish(policy, cfg: TrainConfig, root: Path, version: int) -> tuple[WeightsHandoff | None, dict]:
    """Gather the full weights once (every worker takes part); rank 0 hands them to the rollout engines: one
    `ray.put` (memory sync) or an HF directory under `root` (disk). Returns (handoff, weights) on rank 0 and
    (None, {}) on the others."""
    weights = full_weights(policy.model)
    if dist.get_rank() != 0:
        return None, weights
    if cfg.rollout.weight_sync == "memory":
        return WeightsHandoff(version, ref=[ray.put(weights)]), weights
    shutil.rmtree(root / f"v{version - 2}", ignore_errors=True)  # the engine may still read v{version - 1}
    return WeightsHandoff(version, directory=str(policy.save(root / f"v{version}", weights))), weights


def _sync_fields(timing: SyncTiming | None) -> dict:
    if timing is None:
        return {"weight_sync_s": None}
    return {"weight_sync_s": timing.seconds, "weight_sync_window": [timing.started_at, timing.finished_at],
            "replica_pause_s": timing.pause_s}


def train_loop(loop_config: dict) -> None:
    """Runs on every Ray Train worker: the whole pipelined GRPO+ loop. Rank 0 drives the rollouts, rewards, logs
    and weight syncs; every worker holds an FSDP shard of the policy and trains on its part of each batch."""
    import ray.train
    import ray.train.torch

    from training.metrics import TrainingMetrics

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
    weights_root = Path(cfg.rollout.weights_dir) / cfg.name if cfg.rollout.weights_dir else work
    policy = make_policy(cfg)
    if cfg.trainer_use_gpu:
        policy.model.to(ray.train.torch.get_device())
    shard_policy(policy.model, policy.FORWARD_METHODS)
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
    # A private engine starts from the base model's weights; a served app may serve anything of the same shape.
    if checkpoint or cfg.warm_start.steps or cfg.rollout.backend == "served":
        handoff, _ = _publish(policy, cfg, weights_root, state["version"])
        if lead:
            ray.get(rollout.load_weights.remote(handoff))
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
        batch = rewards = synced = None
        if lead:
            batch = ray.get(pending)
            rewards = [r.reward for r in ray.get(batch.reward_refs)]
            # The previous step's weight sync (in one-off mode it ran right after this batch sampled).
            synced = ray.get(sync) if sync is not None else None
            if cfg.pipeline == "one_off" and not last:
                pending = _submit(rollout, stream, cfg, step + 1, rewarders)
        t_wait = time.perf_counter() - t0
        samples, rewards = _broadcast((batch.samples if lead else None, rewards))
        t1 = time.perf_counter()
        metrics = grpo_update(policy, optimizer, samples, rewards, cfg, seed=cfg.data.seed + step)
        t_train = time.perf_counter() - t1
        version += 1
        handoff, weights = _publish(policy, cfg, weights_root, version)
        if lead:
            sync = rollout.load_weights.remote(handoff)
            if cfg.pipeline == "sync" or last:
                synced, sync = ray.get(sync), None
            if cfg.pipeline == "sync" and not last:
                pending = _submit(rollout, stream, cfg, step + 1, rewarders)
            metrics.update({
                "step": step, "mean_reward": sum(rewards) / len(rewards),
                "response_tokens": sum(len(s.response_ids) for s in samples) / len(samples),
                "max_response_tokens": batch.max_tokens, "staleness": step - batch.weights_version,
                "generate_s": batch.generate_seconds, "wait_rollout_s": t_wait, "train_s": t_train,
                **_sync_fields(synced), "step_s": time.perf_counter() - t0,
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
            _checkpoint(work / f"checkpoint-{step + 1}", policy, optimizer, state, metrics, handoff, weights)
        else:
            ray.train.report(metrics)
    shutil.rmtree(work, ignore_errors=True)


def _checkpoint(ckpt: Path, policy, optimizer, state: dict, metrics: dict, handoff: WeightsHandoff | None,
                weights: dict) -> None:
    """Every worker writes its shards (`sharded/`, loadable on any worker count) and reports its directory; Ray
    Train merges them into one checkpoint. Rank 0 (which holds this step's gathered `weights`, not gathered a
    second time) adds them in HF format as `model/` (servable as it is; hard links to the step's directory when
    it synced through disk) and the loop state."""
    import ray.train

    save_sharded(ckpt / "sharded", policy.model, optimizer)
    if handoff is not None:
        if handoff.directory:
            shutil.copytree(handoff.directory, ckpt / "model", copy_function=os.link)
        else:
            policy.save(ckpt / "model", weights)
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
            cfg.rollout.served_model, cfg.model.resolved(), cfg.data.seed, app_name=cfg.rollout.app_name,
            base_url=cfg.rollout.base_url, admin_token_env=cfg.rollout.admin_token_env,
            request_timeout_s=cfg.rollout.request_timeout_s, family=cfg.model.family,
            request_fields=dict(cfg.rollout.request_fields))
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
    # Sampling through a Serve app's handle: join the cluster it runs on (RAY_ADDRESS, or the local one).
    ray.init(address="auto" if cfg.rollout.app_name else None, include_dashboard=False, ignore_reinit_error=True)
    result = run(cfg, args.resume)
    print(f"metrics: {cfg.metrics_path()}")
    print(f"checkpoint: {result.checkpoint.path if result.checkpoint else None}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
