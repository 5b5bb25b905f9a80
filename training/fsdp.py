"""The policy sharded over the trainer's workers with FSDP2 (`fully_shard`), and what sharding changes around it.

DeepCoder's 14B policy does not fit one GPU with its AdamW state (14B x 16 bytes), so every Ray Train worker holds
one shard of each decoder layer, of the embeddings and of the head, and all-gathers a layer's parameters just
before using it. The process group is the one Ray Train forms (gloo on CPU, NCCL on GPU); a single worker runs the
same code over a mesh of one.

- Data parallel over samples: each worker computes its part of a mini-batch; its loss is divided by the token
  count of the whole mini-batch (summed over workers) and FSDP sums, instead of averaging, the gradients, so N
  workers take the step one worker takes on the whole mini-batch (`tests/test_fsdp.py`: 2 workers vs 1).
- Weights for the rollout engines are gathered once per sync into full tensors on rank 0 (`full_weights`).
- Checkpoints are sharded (`torch.distributed.checkpoint`: one file per worker plus metadata) and load on any
  worker count, the optimiser state included.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method


def rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def shard_policy(model: torch.nn.Module, forward_methods: tuple[str, ...] = ()) -> torch.nn.Module:
    """`fully_shard` every decoder layer (`model.model.layers`: the transformers causal-LM layout, and Dream's),
    then the root (embeddings, final norm, head; tied embeddings stay one parameter). Gradients are summed over
    workers. `forward_methods`: root methods called instead of `forward` (the diffusion LM's packed forward), which
    FSDP2 must wrap too to gather the root's parameters around them."""
    if not dist.is_initialized():
        raise RuntimeError("shard_policy needs the trainer's process group (Ray Train forms it on every worker)")
    device = next(model.parameters()).device.type
    mesh = init_device_mesh(device, (dist.get_world_size(),))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    for name in forward_methods:
        register_fsdp_forward_method(model, name)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # a plain SUM: gloo has no PREMUL_SUM
    return model


def all_sum(*values: float) -> list[float]:
    """Each value summed over the workers (as float64 on the CPU: exact enough for counts and loss sums)."""
    tensor = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized() and dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor.cpu().tolist()


def full_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) weights on rank 0's CPU, for the rollout engines and HF export; {} on other ranks.
    Every worker must call it (it all-gathers)."""
    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_world_size() == 1:  # nothing was gathered: these are the live CPU parameters, which the next step
        weights = {name: tensor.clone() for name, tensor in weights.items()}  # would change under the reader
    return weights


def save_sharded(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every worker writes its shards of the weights and of the optimiser state into `directory`."""
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(directory))


def load_sharded(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load a `save_sharded` checkpoint written by any number of workers into this (sharded) model/optimiser."""
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=str(directory))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
