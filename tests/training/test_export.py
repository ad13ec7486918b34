"""ONNX export with its parity check, and the network definitions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from models.networks import build_network
from training.export import ExportError, export_onnx


@pytest.mark.parametrize("name", ["basic_unet", "segresnet"])
def test_export_matches_pytorch_and_keeps_dynamic_axes(name: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = build_network(name, features=8)  # type: ignore[arg-type]
    real = np.random.default_rng(0).random((16, 32, 32), dtype=np.float32)
    report = export_onnx(net, tmp_path / "m.onnx", (16, 32, 32), real_input=real)
    assert [c.input_name for c in report.comparisons] == ["random", "random, other size", "real"]
    assert all(c.max_abs_error < 1e-4 for c in report.comparisons)
    assert "max abs" in report.summary()
    session = ort.InferenceSession(str(report.onnx_path), providers=["CPUExecutionProvider"])
    out = session.run(None, {"image": np.zeros((1, 1, 32, 48, 64), np.float32)})[0]
    assert out.shape == (1, 1, 32, 48, 64)
    assert out.min() >= 0.0 and out.max() <= 1.0  # a probability


class Unexportable(torch.nn.Module):
    """Differs between PyTorch and the traced graph: data-dependent Python control flow."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if float(x.mean()) > 0.7:  # traced once with the example input, frozen in the graph
            return torch.sigmoid(x)
        return torch.sigmoid(-x)


def test_an_export_that_disagrees_is_refused_with_the_figures(tmp_path: Path) -> None:
    real = np.full((8, 8, 8), 0.9, dtype=np.float32)  # mean above 0.7: the other branch
    with pytest.raises(ExportError, match=r"disagree on the real input.*max abs"):
        export_onnx(Unexportable(), tmp_path / "bad.onnx", (8, 8, 8), real_input=real)


def test_bad_network_name() -> None:
    with pytest.raises(ValueError, match="unknown network"):
        build_network("resnet", 8)  # type: ignore[arg-type]
