"""Route a VAE's 3-D convolutions on the CPU to oneDNN, which PyTorch's backend choice skips for video shapes.

PyTorch picks the convolution backend in aten's `ConvParams::use_mkldnn`. For a float32 input of batch 1 it takes
oneDNN only when `N * C * D * H > 20480`, a rule written for 4-D inputs (N * C * H * W) that, applied to a 5-D
video tensor, leaves out the width. A video VAE's decoder runs its 3x3x3 convolutions on few channels over many
pixels, so every layer below the full resolution falls under the line and runs the naive `slow_conv3d`: 4-7x slower
than oneDNN on the same shape here (CogVideoX's tiny VAE at 360p: 440 ms against ~65 ms a layer), the decode's
largest cost, which on the CPU default is over half of a job. 1x1x1 kernels keep the stock choice: for those
(CogVideoX's spatial norm over the latents) single-threaded oneDNN is the slower one, as aten's own rule says.
The result equals the stock path's to float32 rounding (~2e-5 on pixels in [-1, 1])."""

from __future__ import annotations

import types

import torch
from torch import nn


def _onednn_conv_forward(self: nn.Conv3d, input: torch.Tensor, weight: torch.Tensor,
                         bias: torch.Tensor | None) -> torch.Tensor:
    if (input.device.type != "cpu" or input.dtype != torch.float32 or self.padding_mode != "zeros"
            or isinstance(self.padding, str) or tuple(weight.shape[-3:]) == (1, 1, 1)):
        return nn.Conv3d._conv_forward(self, input, weight, bias)
    return torch.ops.aten.mkldnn_convolution(input.contiguous(), weight.contiguous(), bias, self.padding,
                                             self.stride, self.dilation, self.groups)


def route_conv3d_to_onednn(module: nn.Module) -> int:
    """Make every `nn.Conv3d` inside `module` (subclasses too: the families' causal convolutions call
    `Conv3d.forward`) run float32 CPU inputs through oneDNN; other devices and dtypes keep the stock path.
    Returns how many convolutions were routed."""
    convs = [m for m in module.modules() if isinstance(m, nn.Conv3d)]
    for conv in convs:
        conv._conv_forward = types.MethodType(_onednn_conv_forward, conv)
    return len(convs)
