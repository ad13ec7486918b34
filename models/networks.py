"""Network definitions for training (imports torch and MONAI; never used by the serving path).

The detector is segmentation-based: a 3D U-Net predicts a per-voxel nodule probability, and
the serving path's postprocessing turns connected components into findings. This keeps the
ONNX graph a plain fully convolutional network (any volume size, sliding window or whole
volume) and reuses the same output for the SEG.
"""

from __future__ import annotations

from typing import Literal

import torch
from monai.networks.nets.basic_unet import BasicUNet
from monai.networks.nets.segresnet import SegResNet

NetworkName = Literal["basic_unet", "segresnet"]


class ProbabilityNet(torch.nn.Module):
    """A segmentation network followed by a sigmoid: input (N, 1, D, H, W) in 0..1, output the
    nodule probability of each voxel, the contract of the model card's "probability" output."""

    def __init__(self, body: torch.nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.body(x))


def build_network(name: NetworkName = "basic_unet", features: int = 16) -> ProbabilityNet:
    """The network family is a configuration choice; both are fully convolutional 3D U-Nets."""
    if features < 4:
        raise ValueError(f"features must be at least 4, got {features}")
    f = features
    if name == "basic_unet":
        body: torch.nn.Module = BasicUNet(
            spatial_dims=3, in_channels=1, out_channels=1, features=(f, f, 2 * f, 4 * f, 8 * f, f)
        )
    elif name == "segresnet":
        body = SegResNet(spatial_dims=3, in_channels=1, out_channels=1, init_filters=f)
    else:
        raise ValueError(f"unknown network {name!r}; use basic_unet or segresnet")
    return ProbabilityNet(body)
