"""A diffusion-LM request's decoding parameters: the client's fields over the model's defaults, checked.

Everything a request could get wrong is refused here, before it reaches the pool,
with `InvalidRequest(param, message)` (HTTP 400 naming the field and its range):
`max_tokens` beyond what the context leaves after the prompt, `steps` outside
1..max_tokens (or not a multiple of the blocks), a block length that does not divide
`max_tokens`, a confidence threshold with a rule that has no confidence.
"""

from __future__ import annotations

import math
import secrets

from api.dllm_config import DecodingDefaults
from api.dllm_schemas import ChatCompletionRequest, CompletionRequest
from api.validation import InvalidRequest
from models.dllm.decoding import DecodeParams


def resolve_params(body: CompletionRequest | ChatCompletionRequest, defaults: DecodingDefaults, prompt_tokens: int,
                   context: int, prompt_field: str) -> DecodeParams:
    """`prompt_field` names what a too-long prompt is reported as ('prompt' or 'messages')."""
    room = context - prompt_tokens
    if room < 1:
        raise InvalidRequest(prompt_field, f"the prompt has {prompt_tokens} tokens; the model's context is {context} "
                             "tokens, prompt and response together")
    asked = getattr(body, "max_completion_tokens", None) or body.max_tokens
    field = "max_completion_tokens" if getattr(body, "max_completion_tokens", None) else "max_tokens"
    if asked is not None and asked > room:
        raise InvalidRequest(field, f"{field} must be in [1, {room}] (the context of {context} tokens minus the "
                             f"prompt's {prompt_tokens}); got {asked}")
    max_tokens = asked or min(defaults.max_tokens, room)

    def pick(name: str):
        value = getattr(body, name)
        return getattr(defaults, name) if value is None else value

    block_length, prefix_cache = pick("block_length"), pick("prefix_cache")
    blocks = 1
    if block_length is not None:
        if max_tokens % block_length:
            raise InvalidRequest("block_length", f"block_length must divide max_tokens ({max_tokens}); got "
                                 f"{block_length}")
        blocks = max_tokens // block_length
    elif prefix_cache:
        raise InvalidRequest("prefix_cache", "prefix_cache needs block_length (the prefix precedes the current block)")
    default_steps = math.ceil(max_tokens / defaults.tokens_per_step / blocks) * blocks  # a multiple of the blocks
    steps = body.steps or default_steps
    if steps > max_tokens:
        raise InvalidRequest("steps", f"steps must be in [1, {max_tokens}] (at most one step per response token, "
                             f"max_tokens={max_tokens}); got {steps}")
    if steps % blocks:
        raise InvalidRequest("steps", f"steps must be a multiple of the {blocks} blocks (max_tokens / block_length); "
                             f"got {steps}")
    alg, alg_temp, threshold = pick("alg"), pick("alg_temp"), pick("confidence_threshold")
    if threshold is not None and (alg == "origin" or alg_temp):
        raise InvalidRequest("confidence_threshold", f"confidence_threshold needs alg maskgit_plus, topk_margin or "
                             f"entropy with alg_temp 0; got alg={alg!r}, alg_temp={alg_temp}")
    return DecodeParams(max_tokens=max_tokens, steps=steps, alg=alg, alg_temp=alg_temp,
                        temperature=pick("temperature"), top_p=pick("top_p"), top_k=pick("top_k"),
                        eos_penalty=pick("eos_penalty"), confidence_threshold=threshold,
                        block_length=block_length, prefix_cache=prefix_cache,
                        seed=secrets.randbelow(2**31) if body.seed is None else body.seed)
