"""DllmIngress: the OpenAI API of the diffusion-LM app (/v1/models, /v1/completions, /v1/chat/completions).

The ingress tokenizes (the chat template comes from the checkpoint's tokenizer),
resolves and checks the decoding parameters, and admits one `NewDllmRequest` per
prompt to the `DllmScheduler`, whose stream acknowledges the admission at once (a
full pool is a 429 before any byte of a stream is sent), then sends the response's
unmasked prefix as it grows. Streamed and unstreamed answers are built from the same
text deltas (`deployments.dllm.text.ResponseText`). A client that disconnects, or a
stop string, cancels the request in the scheduler.

Three methods have no HTTP route, for a trainer on the same Ray cluster holding the
app's deployment handle (coupled-GRPO, `training.coupled_grpo`): `sample` (a whole
completion from a dict body, the route's checks, the response as a dict), `sync_weights`
(every scheduler replica swaps in a state dict from the object store) and
`replica_weights` (what each replica serves) - the same contract as the coder app's.

No `from __future__ import annotations` here: FastAPI reads the route signatures.
"""

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from fastapi import FastAPI
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from api.dllm_config import DllmModelConfig
from api.dllm_schemas import ChatCompletionRequest, CompletionRequest, Usage
from api.dllm_validation import resolve_params
from api.validation import InvalidRequest
from deployments.dllm.scheduler import DllmAdmitted, DllmPrefix, DllmResult
from deployments.dllm.text import ResponseText
from deployments.drain import drain_seconds, overloaded
from deployments.errors import install_error_handlers, openai_error
from engine.messages import NewDllmRequest
from engine.request import RequestStatus
from engine.scheduler import PoolFullError
from models.dllm.checkpoint import load_dllm_tokenizer
from models.dllm.config import DllmConfig

logger = logging.getLogger(__name__)
app = FastAPI(title="DiT-Serve diffusion LM API")
install_error_handlers(app)


class GenerationFailed(RuntimeError):
    """A request admitted to the pool ended without a response (its step failed, or its replica died)."""


@dataclass(frozen=True)
class ServedDllm:
    config: DllmModelConfig
    tokenizer: Any
    context: int  # prompt + response tokens one request may hold
    vocab_size: int

    @classmethod
    def load(cls, config: DllmModelConfig) -> "ServedDllm":
        path: Path = config.resolved_source()
        architecture = DllmConfig.from_dir(path)
        return cls(config, load_dllm_tokenizer(path), architecture.max_position_embeddings, architecture.vocab_size)

    def card(self) -> dict:
        return {"id": self.config.name, "object": "model", "created": 0, "owned_by": "dit-serve",
                "max_model_len": self.context, "decoding": self.config.decoding.model_dump()}


@dataclass
class _Choice:
    """One prompt's request in flight: its admitted stream and its text so far."""

    index: int
    new: NewDllmRequest
    stream: DeploymentResponseGenerator
    text: ResponseText
    ended: bool = False  # the scheduler sent the result, or this side cancelled the request
    token_ids: tuple[int, ...] = ()  # the response's tokens, once it finished


def _final_text(choice: _Choice, result: DllmResult) -> str:
    if result.status is not RequestStatus.FINISHED:
        raise GenerationFailed(result.error or f"the request ended as {result.status.value}")
    choice.token_ids = result.token_ids
    return choice.text.update(result.token_ids, final=True)


def _cancel(choices: list[_Choice]) -> None:
    for choice in choices:
        if not choice.ended:
            choice.stream.cancel()
            choice.ended = True


def _event(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


class _Reply:
    """The OpenAI response objects of one call: completion or chat, whole or as chunks."""

    def __init__(self, model: str, chat: bool, choices: list[_Choice], token_ids: bool = False) -> None:
        self.model, self.chat, self.choices, self.token_ids = model, chat, choices, token_ids
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def usage(self) -> dict:
        prompt = sum(len(c.new.prompt_ids) for c in self.choices)
        completion = sum(c.text.completion_tokens for c in self.choices)
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion).model_dump()

    def whole(self) -> dict:
        if self.chat:
            choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text.text},
                        "finish_reason": c.text.finish_reason(), "logprobs": None} for c in self.choices]
        else:
            choices = [{"index": c.index, "text": c.text.text, "finish_reason": c.text.finish_reason(),
                        "logprobs": None} for c in self.choices]
        if self.token_ids:
            for choice, c in zip(choices, self.choices):
                choice.update(prompt_token_ids=list(c.new.prompt_ids), token_ids=list(c.token_ids))
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": choices, "usage": self.usage()}

    def chunk(self, choice: Optional[_Choice], delta: str) -> dict:
        """One streamed chunk: `delta` text of `choice` ('' with its finish reason when it ends)."""
        choices = []
        if choice is not None:
            finish = choice.text.finish_reason() if delta == "" else None
            if self.chat:
                choices = [{"index": choice.index, "delta": {"role": "assistant", "content": delta},
                            "finish_reason": finish, "logprobs": None}]
            else:
                choices = [{"index": choice.index, "text": delta, "finish_reason": finish, "logprobs": None}]
        return {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": choices}


@serve.deployment(max_ongoing_requests=1000)
@serve.ingress(app)
class DllmIngress:
    def __init__(self, models: list[DllmModelConfig], max_prompt_tokens: Optional[int],
                 scheduler: DeploymentHandle) -> None:
        self.models = {m.name: ServedDllm.load(m) for m in models}
        self.max_prompt_tokens = max_prompt_tokens
        self.scheduler = scheduler

    @app.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def list_models(self) -> dict:
        return {"object": "list", "data": [m.card() for m in self.models.values()]}

    @app.post("/v1/completions")
    async def completions(self, body: CompletionRequest):
        served = self._model(body.model)
        single = isinstance(body.prompt, str) or (body.prompt and isinstance(body.prompt[0], int))
        prompts = [body.prompt] if single else body.prompt
        if not prompts or not all(prompts):
            raise InvalidRequest("prompt", "prompt must be a non-empty string, a non-empty list of token ids, or a "
                                 "non-empty list of either")
        ids = [p if isinstance(p, list) else served.tokenizer.encode(p, add_special_tokens=False) for p in prompts]
        if any(not 0 <= t < served.vocab_size for p in ids for t in p):
            raise InvalidRequest("prompt", f"prompt token ids must be in [0, {served.vocab_size - 1}]")
        return await self._respond(body, served, ids, "prompt", chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatCompletionRequest):
        served = self._model(body.model)
        if served.tokenizer.chat_template is None:
            raise InvalidRequest("model", f"model {body.model!r} has no chat template; use /v1/completions")
        text = served.tokenizer.apply_chat_template([m.model_dump() for m in body.messages], tokenize=False,
                                                    add_generation_prompt=True)
        ids = [served.tokenizer.encode(text, add_special_tokens=False)]
        return await self._respond(body, served, ids, "messages", chat=True)

    # ---- for a trainer in the cluster (no HTTP route) -----------------------------
    async def sample(self, body: dict) -> dict:
        """A whole completion (`body`: the /v1/completions fields); refusals raise ValueError with the route's
        message, a full pool `Overloaded`."""
        try:
            request = CompletionRequest(**body)
        except ValidationError as exc:
            raise ValueError(f"invalid completion request: {exc}") from exc
        if request.stream:
            raise ValueError("sample() answers whole completions: stream must be false")
        response = await self.completions(request)
        if response.status_code != 200:
            raise RuntimeError(f"the completion failed ({response.status_code}): {response.body.decode()}")
        return json.loads(response.body)

    async def sync_weights(self, model: str, weights: list, version: int) -> dict:
        """Every scheduler replica swaps `model`'s weights for `weights` (`[ObjectRef]` of a state dict), labelled
        with the trainer's `version`; returns each replica's `ReloadResult`."""
        self._model(model)
        replicas = await self.scheduler.broadcast("update_weights", model=model, weights=weights,
                                                  trainer_version=version).results_async()
        return {"model": model, "replicas": replicas}

    async def replica_weights(self, model: str) -> list:
        """What every scheduler replica serves for `model` (`WeightsInfo`)."""
        self._model(model)
        return await self.scheduler.broadcast("weights_info", model=model).results_async()

    # ---- one request -----------------------------------------------------------
    def _model(self, name: str) -> ServedDllm:
        if name not in self.models:
            raise InvalidRequest("model", f"model {name!r} is not served here; served: {sorted(self.models)}", 404)
        return self.models[name]

    async def _respond(self, body, served: ServedDllm, prompt_ids: list[list[int]], prompt_field: str, chat: bool):
        token_ids = getattr(body, "return_token_ids", False)
        if token_ids and body.stream:
            raise InvalidRequest("return_token_ids", "return_token_ids is for unstreamed completions; set stream to "
                                 "false")
        requests = []
        for ids in prompt_ids:
            if self.max_prompt_tokens is not None and len(ids) > self.max_prompt_tokens:
                raise InvalidRequest(prompt_field, f"the prompt has {len(ids)} tokens; at most "
                                     f"{self.max_prompt_tokens} are accepted")
            if not ids:
                raise InvalidRequest(prompt_field, "the prompt encodes to no token")
            for choice in range(body.n):  # a seed unset is drawn for each choice
                params = resolve_params(body, served.config.decoding, len(ids), served.context, prompt_field)
                if body.seed is not None:
                    params = dataclasses.replace(params, seed=body.seed + choice)
                requests.append(NewDllmRequest(f"dllm-{uuid.uuid4().hex}", served.config.name, tuple(ids), params))
        choices = await self._admit(requests, served, body.stop_strings())
        reply = _Reply(body.model, chat, choices, token_ids)
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(self._sse(reply, usage), media_type="text/event-stream")
        try:
            async with contextlib.aclosing(self._deltas(choices)) as deltas:
                async for _ in deltas:
                    pass
        except GenerationFailed as exc:
            return openai_error(500, str(exc), code="generation_failed")
        return JSONResponse(reply.whole())

    async def _admit(self, requests: list[NewDllmRequest], served: ServedDllm,
                     stops: tuple[str, ...]) -> list[_Choice]:
        """Admit every prompt's request or none: the scheduler's first message acknowledges the admission."""
        choices: list[_Choice] = []
        try:
            for index, new in enumerate(requests):
                stream = self.scheduler.options(stream=True).generate.remote(new)
                choices.append(_Choice(index, new, stream, ResponseText(served.tokenizer, stops,
                                                                        new.params.max_tokens)))
                ack = await stream.__anext__()
                if not isinstance(ack, DllmAdmitted):
                    raise GenerationFailed(f"the scheduler answered {type(ack).__name__} instead of an admission")
        except BaseException as exc:
            _cancel(choices)
            if isinstance(exc, PoolFullError):
                drain_s = drain_seconds(await self.scheduler.load.remote())
                raise overloaded(f"the diffusion-LM pool is full: {exc}", drain_s) from exc
            if isinstance(exc, RayActorError):
                raise GenerationFailed(f"the diffusion-LM scheduler replica died: {exc}") from exc
            raise
        return choices

    async def _deltas(self, choices: list[_Choice]) -> AsyncIterator[tuple[_Choice, str]]:
        """(choice, new text) as each choice's prefix grows, in arrival order; every choice ends with ''."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(choice: _Choice) -> None:
            try:
                async for item in choice.stream:
                    if isinstance(item, DllmPrefix):
                        delta = choice.text.update(item.token_ids, final=False)
                    else:
                        choice.ended = True
                        delta = _final_text(choice, item)
                    if delta:
                        await queue.put((choice, delta))
                    if choice.text.stopped:  # a stop string ended the text: the request need not run on
                        _cancel([choice])
                        break
                if not choice.ended:
                    raise GenerationFailed("the diffusion-LM scheduler ended the stream without a result")
                await queue.put((choice, ""))
            except RayActorError as exc:
                await queue.put(GenerationFailed(f"the diffusion-LM scheduler replica died: {exc}"))
            except Exception as exc:
                await queue.put(exc)

        tasks = [asyncio.ensure_future(pump(c)) for c in choices]
        try:
            open_choices = len(choices)
            while open_choices:
                item = await queue.get()
                if isinstance(item, Exception):
                    raise item
                open_choices -= item[1] == ""
                yield item
        finally:
            for task in tasks:
                task.cancel()
            _cancel(choices)  # a disconnected client or a stop string: the scheduler frees the rest

    async def _sse(self, reply: "_Reply", include_usage: bool) -> AsyncIterator[str]:
        try:
            async with contextlib.aclosing(self._deltas(reply.choices)) as deltas:
                async for choice, delta in deltas:
                    yield _event(reply.chunk(choice, delta))
            if include_usage:
                yield _event(reply.chunk(None, "") | {"choices": [], "usage": reply.usage()})
        except GenerationFailed as exc:
            yield _event({"error": {"message": str(exc), "type": "server_error", "param": None,
                                    "code": "generation_failed"}})
        yield "data: [DONE]\n\n"
