"""models.onednn_conv: a VAE's 3x3x3 convolutions on video shapes run in oneDNN (not aten's slow_conv3d), with the
stock path's result; 1x1x1 kernels and bfloat16 keep the stock choice; the served adapters' VAEs are routed."""

from __future__ import annotations

import torch
from torch import nn
from torch.profiler import profile

from models import load_adapter
from models.onednn_conv import route_conv3d_to_onednn
from tests.conftest import tiny_spec


def _kernels(module: nn.Module, x: torch.Tensor) -> set[str]:
    with torch.no_grad(), profile() as prof:
        module(x)
    return {e.key for e in prof.key_averages() if "conv" in e.key}


def test_a_video_shape_below_atens_line_runs_in_onednn_with_the_stock_result():
    torch.manual_seed(0)
    conv = nn.Conv3d(8, 8, 3, padding=1)
    x = torch.randn(1, 8, 5, 40, 72)  # 1 * 8 * 5 * 40 = 1600 <= 20480: aten picks slow_conv3d
    assert "aten::slow_conv3d_forward" in _kernels(conv, x)
    with torch.no_grad():
        stock = conv(x)
    assert route_conv3d_to_onednn(conv) == 1
    assert "aten::mkldnn_convolution" in _kernels(conv, x) and "aten::slow_conv3d_forward" not in _kernels(conv, x)
    with torch.no_grad():
        torch.testing.assert_close(conv(x), stock, rtol=1e-5, atol=1e-5)


def test_pointwise_kernels_and_bfloat16_keep_the_stock_choice():
    pointwise = nn.Conv3d(4, 8, 1)
    route_conv3d_to_onednn(pointwise)
    assert "aten::mkldnn_convolution" not in _kernels(pointwise, torch.randn(1, 4, 5, 40, 72))
    half = nn.Conv3d(8, 8, 3, padding=1).to(torch.bfloat16)
    route_conv3d_to_onednn(half)
    with torch.no_grad():
        assert half(torch.randn(1, 8, 3, 16, 16, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_the_served_vae_is_routed():
    adapter = load_adapter(tiny_spec("cogvideox"), parts=("vae",))
    convs = [m for m in adapter.pipeline.vae.modules() if isinstance(m, nn.Conv3d)]
    assert convs and all("_conv_forward" in m.__dict__ for m in convs)
