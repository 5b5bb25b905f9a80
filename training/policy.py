"""The trainer's copy of the policy: token log-probs, entropy, supervised warm start, weight export.

Prompts are rendered with the model's own chat template (DeepCoder has no system
prompt), exactly as the rollout engine and the coder app render them, so the
log-probs the trainer computes are of the same token sequences that were sampled.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from training.fsdp import all_sum, rank_and_world
from training.problems import Problem, chat_prompt
from training.rollout import Sample


@dataclass(frozen=True)
class Sequences:
    """Right-padded prompt+response ids with the positions of response tokens marked."""

    input_ids: torch.Tensor       # (batch, length)
    attention_mask: torch.Tensor  # (batch, length)
    response_mask: torch.Tensor   # (batch, length - 1): 1 where the next token is a response token


class Policy:
    FORWARD_METHODS: tuple[str, ...] = ()  # only forward(): FSDP2's default hooks gather the parameters

    def __init__(self, path: str, dtype: torch.dtype = torch.float32) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        self.model.train()

    def prompt(self, statement: str) -> str:
        return chat_prompt(self.tokenizer, statement)

    def pack(self, prompts: list[list[int]], responses: list[list[int]]) -> Sequences:
        lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
        width = max(lengths)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        attention = torch.zeros((len(prompts), width), dtype=torch.long)
        response = torch.zeros((len(prompts), width - 1))
        for i, (p, r) in enumerate(zip(prompts, responses)):
            ids[i, :len(p) + len(r)] = torch.tensor(p + r)
            attention[i, :len(p) + len(r)] = 1
            response[i, len(p) - 1:len(p) + len(r) - 1] = 1  # position t predicts token t + 1
        return Sequences(ids, attention, response)

    def prepare(self, samples: list[Sample], seed: int, indices: list[int]) -> Sequences:
        """The samples as the loss sees them (`seed`, `indices`: for estimators that draw masks; exact here)."""
        return self.pack([s.prompt_ids for s in samples], [s.response_ids for s in samples])

    def token_logprobs(self, seq: Sequences) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-prob of every next token (batch, length - 1) and the mean entropy over response tokens."""
        logits = self.model(input_ids=seq.input_ids, attention_mask=seq.attention_mask).logits[:, :-1].float()
        logp = torch.log_softmax(logits, dim=-1)
        taken = logp.gather(-1, seq.input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        with torch.no_grad():
            entropy = -(logp.exp() * logp).sum(-1)
            mean_entropy = (entropy * seq.response_mask).sum() / seq.response_mask.sum().clamp_min(1)
        return taken, mean_entropy

    def warm_start(self, problems: list[Problem], steps: int, batch: int, lr: float, seed: int = 0) -> list[float]:
        """Supervised fine-tuning on (prompt, reference solution + EOS); returns the loss curve. Data parallel
        like `learner.grpo_update` when the model is sharded over several workers (each takes every N-th pair)."""
        rank, world = rank_and_world()
        rng = random.Random(seed)
        pairs = [(self.prompt(p.statement), s) for p in problems for s in p.reference_solutions]
        optimizer = torch.optim.AdamW(self.model.parameters(), lr=lr)
        losses = []
        for _ in range(steps):
            chosen = [pairs[rng.randrange(len(pairs))] for _ in range(batch)][rank::world]
            prompts = [self.tokenizer(p, add_special_tokens=False).input_ids for p, _ in chosen]
            targets = [self.tokenizer(s, add_special_tokens=False).input_ids + [self.tokenizer.eos_token_id]
                       for _, s in chosen]
            seq = self.pack(prompts, targets)
            [tokens] = all_sum(float(seq.response_mask.sum()))
            logp, _ = self.token_logprobs(seq)
            loss = -(logp * seq.response_mask).sum() / tokens
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(all_sum(loss.item())[0])
        return losses

    def save(self, directory: Path, weights: dict[str, torch.Tensor]) -> Path:
        """`weights` (full, from `fsdp.full_weights`) + tokenizer in HF format: what vLLM's in-place reload and the
        coder app read."""
        directory.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(directory, state_dict=weights, safe_serialization=True)
        self.tokenizer.save_pretrained(directory)
        return directory
