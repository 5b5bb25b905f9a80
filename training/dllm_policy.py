"""The trainer's copy of a masked-diffusion coder (Dream / DiffuCoder layout, `models.dllm`), trainable.

The same role as `training.policy.Policy` for the causal coder, with what a diffusion LM changes:
- log-likelihoods are estimated under random masks (`training.coupled_grpo`), over the canvas the response was
  decoded on (`Sample.max_tokens` positions after the prompt);
- the supervised warm start is masked-diffusion SFT: each demonstration's canvas (solution, then EOS to the
  canvas length, so the model learns where a response ends) gets a mask ratio t ~ U(0, 1], a Bernoulli(t) mask
  (at least one position), and the loss is the mean of -log p over the masked positions of the batch. Dream's
  and LLaDA's SFT weight each position by 1/t instead (the ELBO); at small t that puts weights up to 1/t_min on
  single tokens, and on the tiny model it learned far slower (600 steps of 32: exact answers 0.25 with 1/t,
  0.83 without);
- the weights are exported in Dream's layout (`save_dream_checkpoint`), which the diffusion-LM app loads.

The model is loaded with our architecture (`load_dllm`: no remote code), SDPA attention (differentiable on every
device), and runs its packed forward, which FSDP2 is told about (`FORWARD_METHODS`).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from models.dllm.checkpoint import load_dllm, load_dllm_tokenizer, save_dream_checkpoint
from training.coupled_grpo import CanvasBatch, Estimator, canvas_batch, estimate_logprobs, sample_seed
from training.fsdp import all_sum, rank_and_world
from training.problems import Problem, chat_prompt

if TYPE_CHECKING:
    from training.rollout import Sample


class DllmPolicy:
    FORWARD_METHODS = ("forward_packed",)  # called instead of forward(): FSDP2 must gather parameters around it

    def __init__(self, path: str, dtype: torch.dtype = torch.float32, estimator: Estimator = "coupled",
                 mask_pairs: int = 1, mask_ratio_low: float = 0.2, canvas_tokens: int = 64) -> None:
        self.model = load_dllm(path, dtype, attention_backend="sdpa")
        self.model.train()
        self.tokenizer = load_dllm_tokenizer(path)
        self.estimator, self.mask_pairs, self.mask_ratio_low = estimator, mask_pairs, mask_ratio_low
        self.canvas_tokens = canvas_tokens  # the warm start's canvas: the first stage's max_response_tokens
        self.mask_id, self.eos_id = self.model.config.mask_token_id, self.model.config.eos_token_id

    def prompt(self, statement: str) -> str:
        return chat_prompt(self.tokenizer, statement)

    def prepare(self, samples: list[Sample], seed: int, indices: list[int]) -> CanvasBatch:
        """The samples' canvases and masks; sample `indices[i]` of the batch draws its masks from its own seed."""
        return canvas_batch([s.prompt_ids for s in samples], [s.response_ids for s in samples],
                            [s.max_tokens for s in samples], self.eos_id, self.mask_pairs, self.estimator,
                            self.mask_ratio_low, [sample_seed(seed, i) for i in indices])

    def token_logprobs(self, batch: CanvasBatch) -> tuple[torch.Tensor, torch.Tensor]:
        return estimate_logprobs(self.model, batch, self.mask_id)

    def warm_start(self, problems: list[Problem], steps: int, batch: int, lr: float, seed: int = 0) -> list[float]:
        """Masked-diffusion SFT on (prompt, reference solution) canvases; returns the loss curve. Data parallel like
        the GRPO+ update: each of N workers takes every N-th pair and the loss is per token of the whole batch."""
        rank, world = rank_and_world()
        rng = random.Random(seed)
        generator = torch.Generator().manual_seed(seed)  # every worker draws every mask: the same for any N
        pairs = [(self.tokenizer(self.prompt(p.statement), add_special_tokens=False).input_ids,
                  self.tokenizer(s, add_special_tokens=False).input_ids[:self.canvas_tokens])
                 for p in problems for s in p.reference_solutions]
        optimizer = torch.optim.AdamW(self.model.parameters(), lr=lr)
        losses = []
        for _ in range(steps):
            drawn = [(pairs[rng.randrange(len(pairs))], self._sft_mask(generator)) for _ in range(batch)]
            ids, lengths, rows, targets = [], [], [], []
            for (prompt, answer), mask in drawn[rank::world]:
                canvas = torch.tensor(answer + [self.eos_id] * (self.canvas_tokens - len(answer)))
                start = sum(lengths)
                ids += [torch.tensor(prompt), torch.where(mask, self.mask_id, canvas)]
                positions = mask.nonzero().squeeze(-1)
                rows.append(start + len(prompt) + positions - 1)
                targets.append(canvas[positions])
                lengths.append(len(prompt) + self.canvas_tokens)
            [tokens] = all_sum(float(sum(len(t) for t in targets)))
            logits = self.model.forward_packed(torch.cat(ids), lengths, logit_rows=torch.cat(rows)).float()
            nll = torch.nn.functional.cross_entropy(logits, torch.cat(targets), reduction="none")
            loss = nll.sum() / tokens
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(all_sum(loss.item())[0])
        return losses

    def _sft_mask(self, generator: torch.Generator) -> torch.Tensor:
        """A Bernoulli(t) mask over the canvas, t ~ U(0, 1], with at least one masked position."""
        ratio = float(torch.rand((), generator=generator).clamp_min(1e-3))
        mask = torch.rand(self.canvas_tokens, generator=generator) < ratio
        if not mask.any():
            mask[int(torch.randint(self.canvas_tokens, (1,), generator=generator))] = True
        return mask

    def save(self, directory: Path, weights: dict[str, torch.Tensor]) -> Path:
        """`weights` (full, from `fsdp.full_weights`) + tokenizer in Dream's layout: what the diffusion-LM app loads."""
        return save_dream_checkpoint(self.model, directory, self.tokenizer, state=weights)
