"""Dream's `_sample` loop for one request, as the tests' reference for the packed engine decoder.

With `block_length` it is the block-wise loop of LLaDA / Fast-dLLM without a cache: blocks
left to right, each given steps / blocks steps of Dream's schedule over its own masks (a
block unmasked early ends early and the next starts at once).
"""

from __future__ import annotations

import torch

from models.dllm.decoding import DecodeParams, sample_tokens


def reference_decode(model, prompt: list[int], params: DecodeParams, mask_id: int, eos_ids: tuple[int, ...]):
    """A plain loop over full (1, L) forwards, logits shifted by one."""
    x = torch.tensor([prompt + [mask_id] * params.max_tokens])
    generator = torch.Generator().manual_seed(params.seed)
    block_length = params.block_length or params.max_tokens
    per_block = params.steps // params.blocks
    timesteps = torch.linspace(1, params.eps, per_block + 1)
    i = 0
    for block in range(params.blocks):
        start = len(prompt) + block * block_length
        for j in range(per_block):
            mask_index = torch.zeros_like(x[0], dtype=torch.bool)
            mask_index[start:start + block_length] = x[0, start:start + block_length] == mask_id
            if not mask_index.any():
                break
            with torch.no_grad():
                logits = model(x)[0]
            logits = torch.cat([logits[:1], logits[:-1]])
            mask_logits = logits[mask_index].clone()
            mask_logits[:, mask_id] = float("-inf")
            mask_logits[:, list(eos_ids)] -= params.eos_penalty * (1 - i / params.steps)
            last = j == per_block - 1 or i == params.steps - 1
            t, s = timesteps[j], timesteps[j + 1]
            x0 = torch.full((int(mask_index.sum()),), mask_id)
            if params.alg == "origin":
                p_transfer = 1 - s / t if not last else 1
                transfer = torch.rand(x0.shape[0], generator=generator) < p_transfer
                x0[transfer] = sample_tokens(mask_logits[transfer], params, generator)[0]
            else:
                tokens, confidence, _ = sample_tokens(mask_logits, params, generator)
                n = mask_index.sum()
                count = int(n * (1 - s / t)) if not last else int(n)
                if count > 0:
                    if params.alg_temp:
                        chosen = torch.multinomial(torch.softmax(confidence / params.alg_temp, -1), count,
                                                   generator=generator)
                    else:
                        chosen = torch.topk(confidence, count).indices
                    x0[chosen] = tokens[chosen]
            x[0, mask_index] = x0
            i += 1
    return x[0, len(prompt):].tolist()
