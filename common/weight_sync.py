"""In-memory weight sync into vLLM: the trainer's full weights reach every engine worker without a disk.

A trainer gathers its full weights once per step (`training.fsdp.full_weights`), puts
the state dict in the Ray object store once, and every rollout engine (the coder app's
replicas, or the trainer's private engine) takes it from there. Inside an engine the
weights must cross into vLLM's worker processes through `collective_rpc`, whose msgpack
transport has no tensor type on the way back in, so they travel as `PackedWeights`:
parameter names, dtypes, shapes and one raw byte buffer per tensor. On the worker,
`WeightSyncExtension` (vLLM's `worker_extension_cls` hook, mixed into every worker,
tensor-parallel ranks included) rebuilds the tensors over those buffers without a copy
and hands them to vLLM's own in-place reload (`reload_weights(weights_iterator=...)`,
the path a directory reload takes, so fused/packed layers and CPU kernel layouts are
rebuilt exactly as from a checkpoint).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch

EXTENSION_CLS = "common.weight_sync.WeightSyncExtension"
"""The `worker_extension_cls` engine argument every engine that takes in-memory weights is started with."""


@dataclass(frozen=True)
class PackedWeights:
    """A state dict as plain msgpack-able fields (what `collective_rpc` can carry)."""

    names: list[str]
    dtypes: list[str]
    shapes: list[list[int]]
    buffers: list[bytes]

    @classmethod
    def pack(cls, weights: dict[str, torch.Tensor]) -> PackedWeights:
        names, dtypes, shapes, buffers = [], [], [], []
        for name, tensor in weights.items():
            tensor = tensor.detach().to("cpu").contiguous()
            names.append(name)
            dtypes.append(str(tensor.dtype).removeprefix("torch."))
            shapes.append(list(tensor.shape))
            buffers.append(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
        return cls(names, dtypes, shapes, buffers)

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) pairs viewing the buffers (read-only: the loader copies them into the parameters)."""
        for name, dtype, shape, buffer in zip(self.names, self.dtypes, self.shapes, self.buffers, strict=True):
            with warnings.catch_warnings():  # bytes are read-only; nothing writes through these views
                warnings.simplefilter("ignore", UserWarning)
                raw = torch.frombuffer(buffer, dtype=torch.uint8) if buffer else torch.empty(0, dtype=torch.uint8)
            yield name, raw.view(getattr(torch, dtype)).reshape(shape)

    def nbytes(self) -> int:
        return sum(len(b) for b in self.buffers)


def load_call(weights: PackedWeights | str) -> tuple[str, dict]:
    """The `collective_rpc` method and kwargs that make every vLLM worker load `weights` in place: packed
    in-memory weights (through `WeightSyncExtension`) or an HF checkpoint directory (vLLM's own reload)."""
    if isinstance(weights, PackedWeights):
        return "load_packed_weights", asdict(weights)
    return "reload_weights", {"weights_path": weights}


class WeightSyncExtension:
    """Methods vLLM mixes into its worker class (`worker_extension_cls`); `self` is the worker."""

    def load_packed_weights(self, names: list[str], dtypes: list[str], shapes: list[list[int]],
                            buffers: list[bytes]) -> None:
        self.reload_weights(weights_iterator=PackedWeights(names, dtypes, shapes, buffers).tensors())
