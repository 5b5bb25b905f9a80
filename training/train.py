"""GRPO+ run on Ray: driver, rollout actor, reward actors, and a Ray Train `TorchTrainer`.

    python -m training.train --config configs/train/tiny-cpu.yaml [--steps N] [--resume CHECKPOINT_DIR]

The driver starts the rollout actor (`training.rollout`), the reward actors, and a
`TorchTrainer` (one CPU worker here; N GPU workers with FSDP on GPU) whose loop
does, per step k:

    batch_k  <- wait for the rollout of step k (sampled, rewards computed as chunks arrived)
    one_off: submit the rollout of step k+1 now, with the current (version k) weights
    train on batch_k: old log-probs, group advantages, GRPO+ loss, mini-batch updates
    export weights (version k+1) -> rollout.load_weights (queued after the in-flight rollout)
    sync:    submit the rollout of step k+1 only now

so with one-off pipelining a batch is sampled by weights at most one step old
(logged as staleness), and the trainer never waits for sampling it could overlap.
The maximum response length follows `context_schedule` by step. Checkpoints hold
the model, the optimiser, the step, the data position and the schedule in force.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import ray
import torch

from training.config import TrainConfig, load_config
from training.grpo import group_advantages, grpo_plus_loss
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


def _train_step(policy, optimizer, batch, rewards, cfg: TrainConfig) -> dict:
    samples = batch.samples
    advantages, groups = group_advantages(torch.tensor(rewards), cfg.rollout.group_size)
    seq = policy.pack([s.prompt_ids for s in samples], [s.response_ids for s in samples])
    truncated = torch.tensor([s.truncated for s in samples])
    with torch.no_grad():
        old_logprobs, entropy = policy.token_logprobs(seq)
    clip, losses = [], []
    parts = [part for _ in range(cfg.algorithm.epochs) for part in torch.randperm(len(samples)).chunk(
        cfg.algorithm.mini_batches)]
    for part in parts:
        sub = type(seq)(seq.input_ids[part], seq.attention_mask[part], seq.response_mask[part])
        logprobs, _ = policy.token_logprobs(sub)
        loss, stats = grpo_plus_loss(logprobs, old_logprobs[part], advantages[part], sub.response_mask,
                                     truncated[part], cfg.algorithm.eps_low, cfg.algorithm.eps_high)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.model.parameters(), cfg.algorithm.max_grad_norm)
        optimizer.step()
        clip.append(stats.clip_fraction)
        losses.append(loss.item())
    return {"loss": sum(losses) / len(losses), "clip_fraction": sum(clip) / len(clip), "entropy": entropy.item(),
            "groups_with_signal": groups.signal_fraction, "truncated": truncated.float().mean().item()}


def evaluate_held_out(rollout, problems: list[Problem], cfg: TrainConfig, rewarders, step: int) -> float:
    """Mean reward of the held-out problems (group_size samples each) with the rollout engine's weights."""
    batch = ray.get(_generate(rollout, problems, cfg, step, len(problems), rewarders))
    return sum(r.reward for r in ray.get(batch.reward_refs)) / len(batch.samples)


def train_loop(loop_config: dict) -> None:
    """Runs on the Ray Train worker: the whole pipelined GRPO+ loop."""
    import ray.train

    from training.metrics import TrainingMetrics
    from training.policy import Policy

    cfg = TrainConfig.model_validate(loop_config["config"])
    gauges = TrainingMetrics(cfg.name)
    rollout, rewarders = loop_config["rollout"], loop_config["rewarders"]
    torch.manual_seed(cfg.data.seed)
    # A restarted worker of this run resumes from the run's latest checkpoint; a new run may
    # start from an earlier run's checkpoint (Ray Train v2 passes it through the loop config).
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and loop_config.get("resume_from"):
        checkpoint = ray.train.Checkpoint(loop_config["resume_from"])
    work = Path(tempfile.mkdtemp(prefix="grpo-"))
    state = {"step": 0, "epoch": 0, "index": 0, "version": 0}
    if checkpoint:
        with checkpoint.as_directory() as ckpt:
            state = json.loads((Path(ckpt) / STATE_FILE).read_text())
            policy = Policy(str(Path(ckpt) / "model"))
            optimizer = torch.optim.AdamW(policy.model.parameters(), lr=cfg.algorithm.lr)
            optimizer.load_state_dict(torch.load(Path(ckpt) / "optimizer.pt"))
            ray.get(rollout.load_weights.remote(str(policy.save(work / "resume")), state["version"]))
    else:
        policy = Policy(cfg.model.resolved())
        optimizer = torch.optim.AdamW(policy.model.parameters(), lr=cfg.algorithm.lr)
    train = _problems(cfg.data.train, held_out=False)
    held_out = _problems(cfg.data.held_out, held_out=True)
    stream = ProblemStream(train, cfg.data.batch_problems, cfg.data.seed, state["epoch"], state["index"])

    if not checkpoint and cfg.warm_start.steps:
        demos = train
        if cfg.data.train == "toy" and cfg.warm_start.label_noise:
            from training.toy_tasks import noisy_demonstrations

            demos = noisy_demonstrations(train, cfg.warm_start.label_noise, cfg.data.seed)
        policy.warm_start(demos, cfg.warm_start.steps, cfg.warm_start.batch, cfg.warm_start.lr, cfg.data.seed)
        ray.get(rollout.load_weights.remote(str(policy.save(work / "warm-start")), 0))
    log = cfg.metrics_path()
    log.parent.mkdir(parents=True, exist_ok=True)
    if held_out and not checkpoint:
        start = {"step": -1, "held_out_reward": evaluate_held_out(rollout, held_out, cfg, rewarders, 0)}
        log.write_text(json.dumps(start) + "\n")
        gauges.record(start)
        print(json.dumps(start), flush=True)

    version = state["version"]
    pending = _submit(rollout, stream, cfg, state["step"], rewarders)
    sync = None
    for step in range(state["step"], cfg.steps):
        t0 = time.perf_counter()
        batch = ray.get(pending)
        rewards = [r.reward for r in ray.get(batch.reward_refs)]
        t_wait = time.perf_counter() - t0
        # The previous step's weight sync (in one-off mode it ran right after this batch sampled).
        t_sync = ray.get(sync) if sync is not None else None
        last = step + 1 == cfg.steps
        if cfg.pipeline == "one_off" and not last:
            pending = _submit(rollout, stream, cfg, step + 1, rewarders)
        t1 = time.perf_counter()
        metrics = _train_step(policy, optimizer, batch, rewards, cfg)
        t_train = time.perf_counter() - t1
        version += 1
        weights = policy.save(work / f"v{version}")
        shutil.rmtree(work / f"v{version - 2}", ignore_errors=True)  # the actor may still read v{version-1}
        sync = rollout.load_weights.remote(str(weights), version)
        if cfg.pipeline == "sync" or last:
            t_sync, sync = ray.get(sync), None
        if cfg.pipeline == "sync" and not last:
            pending = _submit(rollout, stream, cfg, step + 1, rewarders)
        metrics.update({
            "step": step, "mean_reward": sum(rewards) / len(rewards),
            "response_tokens": sum(len(s.response_ids) for s in batch.samples) / len(batch.samples),
            "max_response_tokens": batch.max_tokens, "staleness": step - batch.weights_version,
            "generate_s": batch.generate_seconds, "wait_rollout_s": t_wait, "train_s": t_train,
            "weight_sync_s": t_sync, "step_s": time.perf_counter() - t0,
        })
        state = {"step": step + 1, **stream.position(), "version": version,
                 "max_response_tokens": cfg.max_response_tokens(step + 1)}
        if last and held_out:
            metrics["held_out_reward"] = evaluate_held_out(rollout, held_out, cfg, rewarders, step)
        with log.open("a") as f:
            f.write(json.dumps(metrics) + "\n")
        gauges.record(metrics)
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}), flush=True)
        if (step + 1) % cfg.checkpoint_every == 0 or last:
            ckpt = work / f"checkpoint-{step + 1}"
            policy.save(ckpt / "model")
            torch.save(optimizer.state_dict(), ckpt / "optimizer.pt")
            (ckpt / STATE_FILE).write_text(json.dumps(state))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(ckpt)))
            shutil.rmtree(ckpt, ignore_errors=True)
        else:
            ray.train.report(metrics)
    shutil.rmtree(work, ignore_errors=True)


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
        scaling_config=ScalingConfig(num_workers=1, use_gpu=False, resources_per_worker={"CPU": cfg.trainer_cpus}),
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
