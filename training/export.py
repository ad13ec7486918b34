"""ONNX export with a parity check, as MONAI's ``convert_to_onnx(..., verify=True)`` does: the
exported graph is run with ONNX Runtime on random inputs (at the patch size and at another size,
to prove the dynamic axes) and on a real input, and compared with PyTorch in the same call. An
export whose error exceeds the tolerance is refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from numpy.typing import NDArray

from models.registry import sha256_of

INPUT_NAME = "image"
OUTPUT_NAME = "probability"
DYNAMIC = {0: "batch", 2: "depth", 3: "height", 4: "width"}


class ExportError(RuntimeError):
    """The exported model disagrees with PyTorch beyond the tolerance (figures in the message)."""


@dataclass
class Comparison:
    input_name: str
    shape: tuple[int, ...]
    max_abs_error: float
    max_rel_error: float


@dataclass
class ExportReport:
    onnx_path: Path
    sha256: str
    comparisons: list[Comparison] = field(default_factory=list)

    def summary(self) -> str:
        return "; ".join(
            f"{c.input_name} {c.shape}: max abs {c.max_abs_error:.2e}, "
            f"max rel {c.max_rel_error:.2e}"
            for c in self.comparisons
        )


def export_onnx(
    model: torch.nn.Module,
    path: Path,
    patch: tuple[int, int, int],
    real_input: NDArray[np.float32] | None = None,
    atol: float = 1e-4,
    rtol: float = 1e-3,
    seed: int = 0,
) -> ExportReport:
    """Export ``model`` (input (N, 1, D, H, W) in 0..1) to ``path`` and verify it."""
    model = model.eval()
    generator = torch.Generator().manual_seed(seed)
    example = torch.rand((1, 1, *patch), generator=generator)
    torch.onnx.export(
        model,
        (example,),
        str(path),
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_axes={INPUT_NAME: DYNAMIC, OUTPUT_NAME: DYNAMIC},
        opset_version=17,
        dynamo=False,
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    # Another size, still divisible by 16: U-Nets need sizes their pooling levels divide (the
    # runner always feeds whole patches, and pads the whole-volume mode accordingly).
    other = tuple(s + 16 for s in patch)
    inputs: list[tuple[str, torch.Tensor]] = [
        ("random", example),
        ("random, other size", torch.rand((1, 1, *other), generator=generator)),
    ]
    if real_input is not None:
        inputs.append(("real", torch.from_numpy(np.ascontiguousarray(real_input))[None, None]))
    report = ExportReport(path, sha256_of(path))
    for name, tensor in inputs:
        with torch.inference_mode():
            expected = model(tensor).numpy()
        actual = session.run([OUTPUT_NAME], {INPUT_NAME: tensor.numpy()})[0]
        if actual.shape != expected.shape:
            raise ExportError(f"{name} input: ONNX output {actual.shape}, PyTorch {expected.shape}")
        diff = np.abs(actual - expected)
        rel = diff / np.maximum(np.abs(expected), 1e-6)
        report.comparisons.append(
            Comparison(name, tuple(tensor.shape), float(diff.max()), float(rel.max()))
        )
        if not np.allclose(actual, expected, atol=atol, rtol=rtol):
            raise ExportError(
                f"ONNX and PyTorch disagree on the {name} input beyond atol={atol}, rtol={rtol}: "
                + report.summary()
            )
    return report
