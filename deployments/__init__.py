"""Serve shells of the video graph (ingress, text encoder, step scheduler, DiT worker, VAE) and the coder app.

The engine the scheduler and worker shells wrap is in `engine/`, the models in `models/`.
"""

from __future__ import annotations

import torch

from api.config import DeploymentResources


def init_replica(resources: DeploymentResources) -> DeploymentResources:
    """Apply a shell's torch thread count (once per replica process)."""
    if resources.torch_threads:
        torch.set_num_threads(resources.torch_threads)
    return resources
