"""OpenAI ingress of the coder app: Ray Serve LLM's `OpenAiIngress` plus what DeepCoder needs.

Added on top of the stock ingress, nothing else:
- request limits checked before a request reaches an engine (`max_tokens` above the
  context length is refused, not silently capped as vLLM would do);
- DeepCoder's model card asks for no system prompt: system messages are folded
  into the first user turn when the config says so;
- authenticated admin routes: `POST /admin/reload_weights` swaps the weights of
  every replica in place from a checkpoint directory (see `deployments.coder.server`),
  `GET /admin/weights` reports what each replica serves;
- two methods with no HTTP route, for a trainer on the same Ray cluster holding the
  app's deployment handle (only code inside the cluster can hold one): `sample`
  (a completion, the same checks as the route, the response as a dict),
  `sync_weights` (every replica swaps in a state dict from the object store) and
  `replica_weights` (what each replica serves).

Sampling defaults (temperature 0.6, top_p 0.95, max_tokens up to the model length)
are vLLM's own `override_generation_config`, set by the app builder; the ingress
only replaces the legacy completions API's 16-token default with the same budget.

No `from __future__ import annotations` here: FastAPI reads the route signatures.
"""

import hmac
import json
import os
from typing import Any, Optional

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field
from ray.llm._internal.serve.core.ingress.ingress import DEFAULT_ENDPOINTS, make_fastapi_ingress
from ray.serve.llm.ingress import OpenAiIngress
from ray.serve.llm.openai_api_models import ChatCompletionRequest, CompletionRequest, ErrorResponse
from starlette.responses import JSONResponse, Response

from deployments.coder.weights import IncompatibleCheckpoint
from deployments.errors import openai_error

LENGTH_FIELDS = ("max_tokens", "max_completion_tokens")


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content or [] if isinstance(part, dict))


def fold_system_messages(messages: list) -> list:
    """Move system message text to the front of the first user turn (DeepCoder has no system role)."""
    system_text = "\n\n".join(_text_of(m.get("content")) for m in messages if m.get("role") == "system")
    rest = [dict(m) for m in messages if m.get("role") != "system"]
    if not system_text:
        return rest
    for message in rest:
        if message.get("role") == "user":
            message["content"] = f"{system_text}\n\n{_text_of(message.get('content'))}"
            return rest
    return [{"role": "user", "content": system_text}, *rest]


class ReloadWeightsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="Model id whose replicas load the checkpoint.")
    checkpoint_dir: str = Field(min_length=1, description="Absolute path of a HF checkpoint on the serving nodes.")


class CoderIngress(OpenAiIngress):
    def __init__(
        self,
        llm_deployments,
        model_cards,
        *,
        lora_paths=None,
        max_model_len: int,
        default_max_tokens: Optional[int] = None,
        fold_system_prompt: bool = True,
        admin_token_env: str = "CODER_ADMIN_TOKEN",
    ):
        super().__init__(llm_deployments, model_cards, lora_paths=lora_paths)
        self._max_model_len = max_model_len
        self._default_max_tokens = default_max_tokens
        self._fold_system_prompt = fold_system_prompt
        self._admin_token_env = admin_token_env
        self._admin_token = os.environ.get(admin_token_env) or None

    def _unknown_model_error(self, model: Optional[str]) -> Optional[JSONResponse]:
        if model is None or model in self._model_cards:
            return None
        return openai_error(404, f"model {model!r} is not served here; served: {sorted(self._model_cards)}",
                            param="model", error_type="not_found_error")

    def _request_error(self, body) -> Optional[JSONResponse]:
        """Refuse what no engine should see: an unknown model, a length budget beyond the context."""
        if error := self._unknown_model_error(body.model):
            return error
        for field in LENGTH_FIELDS:
            value = getattr(body, field, None)
            if value is not None and not 1 <= value <= self._max_model_len:
                return openai_error(
                    400,
                    f"{field} must be in [1, {self._max_model_len}] (the model's context length, prompt included); "
                    f"got {value}",
                    param=field,
                )
        return None

    async def chat(self, body: ChatCompletionRequest, request: Request) -> Response:
        if error := self._request_error(body):
            return error
        if self._fold_system_prompt:
            body = body.model_copy(update={"messages": fold_system_messages(body.messages)})
        return await super().chat(body, request)

    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        if error := self._request_error(body):
            return error
        if (await request.json()).get("max_tokens") is None:
            # The legacy completions API defaults to 16 tokens (vLLM fills it in while parsing,
            # so only the raw body tells whether the client set it). DeepCoder
            # wants the configured default or the rest of the context: vLLM caps this at
            # max_model_len - prompt length.
            body = body.model_copy(update={"max_tokens": self._default_max_tokens or self._max_model_len})
        return await super().completions(body, request)

    def _auth_error(self, request: Request) -> Optional[JSONResponse]:
        if self._admin_token is None:
            return openai_error(
                403, f"admin routes are disabled: set {self._admin_token_env} on the serving nodes", error_type="forbidden"
            )
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), self._admin_token.encode()):
            return openai_error(401, "missing or wrong bearer token for the admin routes", error_type="unauthorized")
        return None

    async def reload_weights(self, body: ReloadWeightsRequest, request: Request) -> Response:
        if error := self._auth_error(request):
            return error
        if error := self._unknown_model_error(body.model):
            return error
        try:
            handle = self._default_serve_handles[body.model]
            replicas = await handle.broadcast("reload_weights", checkpoint_dir=body.checkpoint_dir).results_async()
        except IncompatibleCheckpoint as exc:
            return openai_error(400, str(exc), param="checkpoint_dir")
        return JSONResponse({"model": body.model, "replicas": replicas})

    async def weights(self, model: str, request: Request) -> Response:
        if error := self._auth_error(request):
            return error
        if error := self._unknown_model_error(model):
            return error
        replicas = await self._default_serve_handles[model].broadcast("weights_info").results_async()
        return JSONResponse({"model": model, "replicas": replicas})

    async def sample(self, body: dict) -> dict:
        """A non-streamed completion for in-cluster callers (`body`: the /v1/completions fields); refusals raise
        ValueError with the route's message."""
        body = CompletionRequest(**body)
        if body.stream:
            raise ValueError("sample() answers whole completions: stream must be false")
        if error := self._request_error(body):
            raise ValueError(json.loads(error.body)["error"]["message"])
        async for response in self._get_response(body=body, call_method="completions"):
            if isinstance(response, ErrorResponse):
                raise ValueError(response.error.message)
            return response.model_dump()
        raise RuntimeError("the engine returned no completion")

    def _replicas_of(self, model: str):
        if model not in self._model_cards:
            raise ValueError(f"model {model!r} is not served here; served: {sorted(self._model_cards)}")
        return self._default_serve_handles[model]

    async def sync_weights(self, model: str, weights: list, version: int) -> dict:
        """Every replica of `model` swaps in `weights` (`[ObjectRef]` of a state dict), labelled with the trainer's
        `version`; returns each replica's `ReloadResult`."""
        replicas = await self._replicas_of(model).broadcast(
            "update_weights", weights=weights, trainer_version=version).results_async()
        return {"model": model, "replicas": replicas}

    async def replica_weights(self, model: str) -> list:
        """What every replica of `model` serves (`WeightsInfo`), for a trainer checking that none lags behind."""
        return await self._replicas_of(model).broadcast("weights_info").results_async()


CODER_ENDPOINTS = {
    **{name: DEFAULT_ENDPOINTS[name] for name in ("models", "model_data", "completions", "chat", "tokenize", "detokenize")},
    "reload_weights": lambda app: app.post("/admin/reload_weights"),
    "weights": lambda app: app.get("/admin/weights/{model:path}"),
}


def coder_ingress_class() -> type:
    """`CoderIngress` wrapped as a FastAPI Serve ingress with the routes above."""
    return make_fastapi_ingress(CoderIngress, endpoint_map=CODER_ENDPOINTS)
