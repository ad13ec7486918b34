"""ONNX export with a parity check, as MONAI's ``convert_to_onnx(..., verify=True)`` does: the
exported graph is run with ONNX Runtime on random inputs (at the patch size and at another size,
to prove the dynamic axes) and on a real input, and compared with PyTorch in the same call. An
export whose error exceeds the tolerance is refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from numpy.typing import NDArray

from models.networks import build_network
from models.registry import ModelCard, sha256_of
from training.dataset import Dataset

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


def export_checkpoint(
    checkpoint: Path,
    name: str,
    version: str,
    out_dir: Path,
    evaluation: dict[str, float] | None = None,
    command: str = "",
    operating_threshold: float = 0.5,
) -> tuple[Path, Path, ExportReport]:
    """Export a training checkpoint to ``out_dir/model.onnx`` with its card: ``best.pt`` (the
    best validated weights) or ``checkpoint.pt`` (the last epoch's, e.g. at the end of a cosine
    schedule when the validation set is too small to choose by)."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    config = state["config"]
    state.setdefault("network", config["network"])
    state.setdefault("features", config["features"])
    net = build_network(state["network"], int(state["features"]))
    net.load_state_dict(state["network_state"])
    patch = tuple(int(v) for v in config.get("inference_patch_size") or config["patch_size"])
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = out_dir / "model.onnx"
    real = np.random.default_rng(1).random(patch, dtype=np.float32)
    report = export_onnx(net, onnx_path, (patch[0], patch[1], patch[2]), real_input=real)
    dims: list[int | str] = ["batch", 1, "depth", "height", "width"]
    data_summary, synthetic = _training_data(Path(config["dataset"]))
    if config.get("init_weights"):
        # Fine-tuned: the card names the starting weights (their own card tells their data).
        data_summary += f"; fine-tuned from the weights in {config['init_weights']}"
    card = ModelCard.model_validate(
        {
            "name": name,
            "version": version,
            "date": date.today(),
            "network": f"{state['network']} (MONAI), features {state['features']}, sigmoid output",
            "description": "Segmentation-based lung nodule detector: per-voxel probability, "
            "connected components become findings.",
            "input": {
                "tensor": {"name": INPUT_NAME, "shape": dims},
                "spacing_mm": config["spacing_mm"],
                "hu_window": config["hu_window"],
                "patch_size": list(patch),
            },
            "output": {
                "tensor": {"name": OUTPUT_NAME, "shape": dims},
                "operating_threshold": operating_threshold,
            },
            "training": {
                "data": data_summary,
                "synthetic": synthetic,
                "command": "; then ".join(
                    c
                    for c in (
                        state.get("command") or f"aidx train (output {config['output']})",
                        command,
                    )
                    if c
                ),
            },
            "evaluation": evaluation or {},
            "sha256": report.sha256,
            "intended_use": "Research and evaluation of the aidx pipeline; not for clinical use.",
            "limitations": [
                "Trained on the data named above only.",
                "Not a medical device; findings must be reviewed by a radiologist.",
            ],
        }
    )
    card_path = out_dir / "card.json"
    card_path.write_text(json.dumps(json.loads(card.model_dump_json()), indent=2) + "\n")
    return onnx_path, card_path, report


def _training_data(dataset_dir: Path) -> tuple[str, bool]:
    """What the card says about the training data: a summary and whether all of it is synthetic
    (every case converted from the phantom generator)."""
    try:
        dataset = Dataset.load(dataset_dir)
    except (OSError, ValueError) as exc:
        return f"dataset at {dataset_dir} (not readable at export: {exc})", False
    kinds = sorted({str((case.source or {}).get("kind", "unknown")) for case in dataset.cases})
    lesions = sum(len(case.lesions) for case in dataset.cases)
    summary = (
        f"{dataset.name}: {len(dataset.cases)} cases, {lesions} lesions ({', '.join(kinds)}); "
        f"{dataset.description}"
    )
    return summary, kinds == ["phantom"]
