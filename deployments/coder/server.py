"""vLLM replica of the coder app: Ray Serve LLM's `LLMServer` plus hot weight reload.

The trainer publishes a checkpoint directory after an optimiser step; every
replica then swaps its weights in place, without a restart:

  1. check the checkpoint's architecture against the served model (no engine pause
     for a checkpoint that cannot load);
  2. `pause(mode="keep", clear_cache=True)`: the scheduler freezes; in-flight
     requests keep their generated tokens and are preempted, so their KV is
     recomputed with the new weights on resume (none is dropped or aborted);
  3. vLLM's in-place `reload_weights(weights_path=...)` on every worker (TP ranks
     included) through `collective_rpc`;
  4. `resume()`.

If step 3 fails the replica reloads the weights it served before and resumes, so
a bad checkpoint never leaves a half-written model serving traffic.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass

from ray.serve import metrics
from ray.serve.llm import LLMConfig, LLMServer

from deployments.coder.weights import check_reloadable, read_model_config


@dataclass(frozen=True)
class WeightsInfo:
    """Which weights a replica serves; `version` counts successful reloads."""

    checkpoint_dir: str
    version: int
    last_reload_seconds: float | None


@dataclass(frozen=True)
class ReloadResult:
    checkpoint_dir: str
    version: int
    pause_seconds: float
    load_seconds: float
    total_seconds: float


class WeightReloadFailed(RuntimeError):
    """The new weights could not be loaded; the replica is serving its previous weights."""


class CoderLLMServer(LLMServer):
    async def __init__(self, llm_config: LLMConfig, **kwargs) -> None:
        await super().__init__(llm_config, **kwargs)
        source = llm_config.model_loading_config.model_source or llm_config.model_id
        self._served_config = read_model_config(source)
        self._weights = WeightsInfo(checkpoint_dir=source, version=0, last_reload_seconds=None)
        self._reload_lock = asyncio.Lock()
        self._reload_seconds = metrics.Histogram(
            "coder_weight_reload_seconds",
            description="Wall time of a hot weight reload (pause, load, resume).",
            boundaries=[0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120],
        )

    async def weights_info(self) -> dict:
        return asdict(self._weights)

    async def reload_weights(self, checkpoint_dir: str) -> dict:
        """Swap in the weights of `checkpoint_dir` without dropping in-flight requests."""
        directory = str(check_reloadable(checkpoint_dir, self._served_config))
        async with self._reload_lock:
            started = time.perf_counter()
            await self.engine.pause(mode="keep", clear_cache=True)
            paused = time.perf_counter()
            try:
                await self._load(directory)
            except Exception as exc:
                await self._load(self._weights.checkpoint_dir)
                raise WeightReloadFailed(
                    f"loading {directory!r} failed ({exc}); the replica still serves {self._weights.checkpoint_dir!r}"
                ) from exc
            finally:
                await self.engine.resume()
            loaded = time.perf_counter()
            total = loaded - started
            self._weights = WeightsInfo(directory, self._weights.version + 1, total)
            self._reload_seconds.observe(total)
            return asdict(ReloadResult(directory, self._weights.version, paused - started, loaded - paused, total))

    async def _load(self, directory: str) -> None:
        await self.engine.collective_rpc("reload_weights", kwargs={"weights_path": directory})
