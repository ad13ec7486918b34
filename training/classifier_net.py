"""The detector's crop classifier as a PyTorch network: its definition, its export to ONNX
(``classifier.onnx``, checked against PyTorch) and the way back, so that training can start from
a shipped model's classifier (``python -m training.detector train --init-from``).

The export folds each batch normalisation into the convolution before it; the way back sets the
folded weights as the convolution's and makes the normalisation an identity with the folded bias
(statistics mean 0 and variance 1 - eps), which it stays while :func:`freeze_norms` holds it in
eval mode: the network starts as exactly the shipped function.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

CROP = 32


def build_classifier() -> Any:
    """The crop classifier: two channels of 32³ -> (logit, log-diameter)."""
    import torch  # noqa: PLC0415 - training only

    def block(cin: int, cout: int, stride: int = 1) -> list[torch.nn.Module]:
        return [
            torch.nn.Conv3d(cin, cout, 3, stride=stride, padding=1, bias=False),
            torch.nn.BatchNorm3d(cout),
            torch.nn.ReLU(inplace=True),
        ]

    class CropClassifier(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            # most of the cost is at the first full-width level: one narrow convolution there
            self.features = torch.nn.Sequential(
                *block(2, 16, stride=2),  # 16³
                *block(16, 24),
                torch.nn.MaxPool3d(2),  # 8³
                *block(24, 32),
                *block(32, 48),
                torch.nn.MaxPool3d(2),  # 4³
                *block(48, 64),
                *block(64, 64),
                torch.nn.AdaptiveAvgPool3d(1),
                torch.nn.Flatten(),
            )
            self.head = torch.nn.Linear(64, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.head(self.features(x))
            return out  # (batch, 2): logit, log diameter

    return CropClassifier()


class ServingHead:
    """Wraps the classifier for export: (probability, diameter mm)."""

    @staticmethod
    def wrap(net: Any) -> Any:
        import torch  # noqa: PLC0415

        class Exported(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.net = net

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                out = self.net(x)
                return torch.stack([torch.sigmoid(out[:, 0]), torch.exp(out[:, 1])], dim=1)

        return Exported()


def export_classifier(checkpoint: Path, target: Path) -> float:
    """``classifier.onnx`` from the checkpoint, checked against PyTorch; returns the largest
    difference seen on random crops (the probability's, and the diameter's relative to the
    diameter)."""
    import onnxruntime as ort  # noqa: PLC0415
    import torch  # noqa: PLC0415

    net = build_classifier()
    net.load_state_dict(torch.load(checkpoint, weights_only=False, map_location="cpu")["net"])
    net.eval()
    exported = ServingHead.wrap(net).eval()
    example = torch.rand(4, 2, CROP, CROP, CROP)
    torch.onnx.export(
        exported,
        (example,),
        str(target),
        input_names=["crops"],
        output_names=["scores"],
        dynamic_axes={"crops": {0: "batch"}, "scores": {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )
    session = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    x = torch.rand(7, 2, CROP, CROP, CROP)
    with torch.no_grad():
        expected = exported(x).numpy()
    got = session.run(None, {"crops": x.numpy()})[0]
    # the probability's difference, and the diameter's relative to it: an untrained diameter
    # head gives thousands of millimetres on random crops, where float32 rounding alone is 1e-1
    scale = np.ones_like(expected)
    scale[:, 1] = np.maximum(np.abs(expected[:, 1]), 1.0)
    diff = float(np.max(np.abs(expected - got) / scale))
    if diff > 1e-3:
        raise SystemExit(f"{target}: ONNX Runtime differs from PyTorch by {diff:.2e}")
    return diff


def from_onnx(path: Path) -> Any:
    """The classifier network with the weights of ``path`` (a ``classifier.onnx`` this module
    exported), batch normalisations as identities carrying the folded biases (see module)."""
    import onnx  # noqa: PLC0415 - training only
    import torch  # noqa: PLC0415
    from onnx import numpy_helper  # noqa: PLC0415

    graph = onnx.load(str(path)).graph
    weights = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    gemms = [n for n in graph.node if n.op_type == "Gemm"]
    net = build_classifier()
    layers = [m for m in net.features if isinstance(m, torch.nn.Conv3d)]
    norms = [m for m in net.features if isinstance(m, torch.nn.BatchNorm3d)]
    if len(convs) != len(layers) or len(gemms) != 1 or any(len(n.input) != 3 for n in convs):
        raise ValueError(
            f"{path}: not a classifier of this design ({len(convs)} convolutions with their "
            f"biases and {len(gemms)} linear layer expected {len(layers)} and 1)"
        )
    with torch.no_grad():
        for node, conv, norm in zip(convs, layers, norms, strict=True):
            w, b = weights[node.input[1]], weights[node.input[2]]
            if tuple(w.shape) != tuple(conv.weight.shape):
                raise ValueError(f"{path}: convolution {node.input[1]} is {w.shape}")
            conv.weight.copy_(torch.from_numpy(np.array(w)))
            norm.weight.fill_(1.0)
            norm.bias.copy_(torch.from_numpy(np.array(b)))
            assert norm.running_mean is not None and norm.running_var is not None
            norm.running_mean.zero_()
            norm.running_var.fill_(1.0 - norm.eps)
        gemm = gemms[0]
        net.head.weight.copy_(torch.from_numpy(np.array(weights[gemm.input[1]])))
        net.head.bias.copy_(torch.from_numpy(np.array(weights[gemm.input[2]])))
    return net


def freeze_norms(net: Any) -> None:
    """Batch normalisations in eval mode (their statistics kept; their scale and shift still
    learn): what a network started from ONNX needs while it trains."""
    import torch  # noqa: PLC0415

    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm3d):
            m.eval()
