"""OpenAI completion / chat-completion schemas of the diffusion-LM app, with the decoding fields as extra body fields.

Only what the server honours is accepted: an unknown field is refused with a 400
naming it (`extra="forbid"`) rather than silently ignored. The diffusion fields
(`steps`, `alg`, `alg_temp`, `eos_penalty`, `confidence_threshold`, `block_length`,
`prefix_cache`) travel in the
`openai` client's `extra_body`; unset fields take the model's configured defaults
(`api.dllm_config.DecodingDefaults`, listed by GET /v1/models).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from models.dllm.decoding import ALGORITHMS


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: int | None = Field(default=None, ge=1, description="Response length; prompt + it <= the context.")
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=1)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1, description="Default: drawn per request.")
    stop: str | list[str] | None = Field(default=None, description="Up to 4 strings; the text ends before the first.")
    n: int = Field(default=1, ge=1, le=16, description="Choices per prompt, each its own request in the pool; with "
                   "a seed, choice j of a prompt decodes with seed + j.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # Diffusion decoding (extra body fields)
    steps: int | None = Field(default=None, ge=1, description="Denoising steps, 1..max_tokens; default: "
                              "ceil(max_tokens / the model's tokens_per_step).")
    alg: Literal[ALGORITHMS] | None = Field(default=None, description="Which masks each step unmasks.")
    alg_temp: float | None = Field(default=None, ge=0)
    eos_penalty: float | None = Field(default=None, ge=0)
    confidence_threshold: float | None = Field(default=None, gt=0, le=1)
    block_length: int | None = Field(default=None, ge=1, description="Block-wise decoding; must divide max_tokens.")
    prefix_cache: bool | None = Field(default=None, description="With block_length: Fast-dLLM's prefix KV cache.")

    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return tuple(s for s in stops if s)


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="A prompt, a list of prompts, or prompts as token ids (a list of ids, or a list of such lists).")
    return_token_ids: bool = Field(default=False, description="Unstreamed only: each choice also carries "
                                   "`prompt_token_ids` and `token_ids` (the response's tokens, before any stop string "
                                   "cut its text), as vLLM does; a trainer scores exactly what was sampled.")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1, description="Same as max_tokens (newer name).")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


FinishReason = Literal["stop", "length"]
