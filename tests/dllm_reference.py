"""Dream's `_sample` loop for one request, as the tests' reference for the packed engine decoder."""

from __future__ import annotations

import torch

from models.dllm.decoding import DecodeParams, sample_tokens


def reference_decode(model, prompt: list[int], params: DecodeParams, mask_id: int, eos_ids: tuple[int, ...]):
    """Dream's `_sample` for one request: a plain loop over full (1, L) forwards, logits shifted by one."""
    x = torch.tensor([prompt + [mask_id] * params.max_tokens])
    generator = torch.Generator().manual_seed(params.seed)
    timesteps = torch.linspace(1, params.eps, params.steps + 1)
    for i in range(params.steps):
        mask_index = x[0] == mask_id
        with torch.no_grad():
            logits = model(x)[0]
        logits = torch.cat([logits[:1], logits[:-1]])
        mask_logits = logits[mask_index].clone()
        mask_logits[:, mask_id] = float("-inf")
        mask_logits[:, list(eos_ids)] -= params.eos_penalty * (1 - i / params.steps)
        t, s = timesteps[i], timesteps[i + 1]
        x0 = torch.full((int(mask_index.sum()),), mask_id)
        if params.alg == "origin":
            p_transfer = 1 - s / t if i < params.steps - 1 else 1
            transfer = torch.rand(x0.shape[0], generator=generator) < p_transfer
            x0[transfer] = sample_tokens(mask_logits[transfer], params, generator)[0]
        else:
            tokens, confidence, _ = sample_tokens(mask_logits, params, generator)
            n = mask_index.sum()
            count = int(n * (1 - s / t)) if i < params.steps - 1 else int(n)
            if count > 0:
                if params.alg_temp:
                    chosen = torch.multinomial(torch.softmax(confidence / params.alg_temp, -1), count,
                                               generator=generator)
                else:
                    chosen = torch.topk(confidence, count).indices
                x0[chosen] = tokens[chosen]
        x[0, mask_index] = x0
    return x[0, len(prompt):].tolist()
