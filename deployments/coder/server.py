"""vLLM replica of the coder app: Ray Serve LLM's `LLMServer` plus hot weight swaps.

The trainer hands new weights to every replica after an optimiser step, either as a
checkpoint directory (`reload_weights`, the admin HTTP route) or in memory
(`update_weights`: a state dict in the Ray object store, from a trainer on the same
cluster). Either way the replica swaps its weights in place, without a restart:

  1. check names and shapes against the served model (no engine pause for weights
     that cannot load);
  2. `pause(mode="keep", clear_cache=True)`: the scheduler freezes; in-flight
     requests keep their generated tokens and are preempted, so their KV is
     recomputed with the new weights on resume (none is dropped or aborted);
  3. vLLM's in-place reload on every worker (TP ranks included) through
     `collective_rpc`: `reload_weights(weights_path=...)` for a directory,
     `load_packed_weights` (`common.weight_sync`) for memory;
  4. `resume()`.

If step 3 fails the replica loads the weights it served before and resumes, so bad
weights never leave a half-written model serving traffic.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict

from ray.serve import metrics
from ray.serve.llm import LLMConfig, LLMServer

from common.weight_sync import PackedWeights, load_call
from deployments.coder.weights import check_reloadable, check_state_dict, expected_shapes, read_model_config
from deployments.weight_swaps import ReloadResult, WeightsInfo


class WeightReloadFailed(RuntimeError):
    """The new weights could not be loaded; the replica is serving its previous weights."""


class CoderLLMServer(LLMServer):
    async def __init__(self, llm_config: LLMConfig, **kwargs) -> None:
        await super().__init__(llm_config, **kwargs)
        source = llm_config.model_loading_config.model_source or llm_config.model_id
        self._served_config = read_model_config(source)
        self._expected_shapes = expected_shapes(source)
        self._weights = WeightsInfo(source=source, version=0, trainer_version=None, last_reload_seconds=None)
        self._load_current: Callable[[], Awaitable[None]] = functools.partial(self._load, source)
        self._reload_lock = asyncio.Lock()
        self._reload_seconds = metrics.Histogram(
            "coder_weight_reload_seconds",
            description="Wall time of a hot weight swap (pause, load, resume).",
            boundaries=[0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120],
            tag_keys=("source",),
        )

    async def weights_info(self) -> dict:
        return asdict(self._weights)

    async def reload_weights(self, checkpoint_dir: str) -> dict:
        """Swap in the weights of `checkpoint_dir` without dropping in-flight requests."""
        directory = str(check_reloadable(checkpoint_dir, self._served_config))
        load = functools.partial(self._load, directory)
        return await self._swap(directory, None, load, load)

    async def update_weights(self, weights: list, trainer_version: int) -> dict:
        """Swap in a state dict from the object store: `weights` is `[ObjectRef]` (in a list, so Serve passes the
        reference and every replica reads the one stored copy). Checked and packed before the engine pauses, off
        the event loop, so users' requests wait only for the load itself."""
        [ref] = weights
        state = await ref
        check_state_dict({name: tuple(t.shape) for name, t in state.items()}, self._expected_shapes,
                         bool(self._served_config.get("tie_word_embeddings")))
        packed = await asyncio.to_thread(PackedWeights.pack, state)
        del state
        # A later failed swap restores these weights from the object store (the replica keeps the reference,
        # not a second copy of the bytes).
        return await self._swap("memory", trainer_version, functools.partial(self._load, packed),
                                functools.partial(self._load_memory, ref))

    async def _swap(self, source: str, trainer_version: int | None, load: Callable[[], Awaitable[None]],
                    load_again: Callable[[], Awaitable[None]]) -> dict:
        """Pause, `load()`, resume; on failure `self._load_current()` (the weights served before) instead.
        `load_again` is kept as the new `_load_current`."""
        async with self._reload_lock:
            started = time.perf_counter()
            await self.engine.pause(mode="keep", clear_cache=True)
            paused = time.perf_counter()
            try:
                await load()
            except Exception as exc:
                await self._load_current()
                raise WeightReloadFailed(
                    f"loading {source!r} failed ({exc}); the replica still serves {self._weights.source!r}"
                ) from exc
            finally:
                await self.engine.resume()
            loaded = time.perf_counter()
            total = loaded - started
            self._load_current = load_again
            self._weights = WeightsInfo(source, self._weights.version + 1, trainer_version, total)
            self._reload_seconds.observe(total, tags={"source": "memory" if source == "memory" else "disk"})
            return asdict(ReloadResult(source, self._weights.version, trainer_version, paused - started,
                                       loaded - paused, total))

    async def _load(self, weights: PackedWeights | str) -> None:
        method, kwargs = load_call(weights)
        await self.engine.collective_rpc(method, kwargs=kwargs)

    async def _load_memory(self, ref) -> None:
        await self._load(await asyncio.to_thread(PackedWeights.pack, await ref))
