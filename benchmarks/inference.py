"""Benchmark: a 300 x 512² phantom CT from DICOM files to findings, SR and SEG with `aidx infer`,
beside PyTorch eager + MONAI `sliding_window_inference` with the same weights, in the same run.

Until the default model ships (training issue), the network is a MONAI BasicUNet with seeded
random weights, exported to ONNX here: the figures measure the engine, not detection quality.
Prints medians over --repeats of each stage (read, preprocess, model, postprocess, write), peak
memory of the `aidx infer` process, and the ratio to the baseline (targets on a 2-core CPU:
<= 10 s per study, peak RSS <= 2 GB, >= 1.5x faster than the baseline).

Usage: python benchmarks/inference.py [--repeats 3] [--slices 300] [--features 8]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

# Run as a script, this folder comes first on sys.path and this file would shadow the
# `inference` package; drop it (the repository root is found through the installed package).
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

from inference.preprocess import PreprocessSpec, preprocess
from inference.volume import load_series
from models.registry import sha256_of
from training.phantom import PhantomOptions, generate

SPACING = (2.0, 1.4, 1.4)
HU_WINDOW = (-1000.0, 400.0)
PATCH = (48, 96, 96)
OVERLAP = 0.25
DIMS: list[Any] = [1, 1, "depth", "height", "width"]


def build_network(features: int) -> Any:
    import torch
    from monai.networks.nets import BasicUNet

    torch.manual_seed(0)
    f = features
    unet = BasicUNet(
        spatial_dims=3, in_channels=1, out_channels=1, features=(f, f, 2 * f, 4 * f, 8 * f, f)
    )
    model = torch.nn.Sequential(unet, torch.nn.Sigmoid())
    model.eval()
    return model


def export(model: Any, path: Path) -> None:
    import torch

    example = torch.zeros((1, 1, *PATCH))
    torch.onnx.export(
        model,
        (example,),
        str(path),
        input_names=["image"],
        output_names=["probability"],
        dynamic_axes={
            n: {0: "batch", 2: "depth", 3: "height", 4: "width"} for n in ("image", "probability")
        },
        opset_version=17,
        dynamo=False,
    )


def card(onnx_path: Path, features: int) -> dict[str, Any]:
    return {
        "name": "bench-unet",
        "version": f"0.0.{features}",
        "date": "2026-11-28",
        "network": f"MONAI BasicUNet, features {features}, random weights (benchmark only)",
        "description": "Engine benchmark stand-in; not a detector.",
        "input": {
            "tensor": {"name": "image", "shape": ["batch", 1, "depth", "height", "width"]},
            "spacing_mm": list(SPACING),
            "hu_window": list(HU_WINDOW),
            "patch_size": list(PATCH),
        },
        "output": {
            "tensor": {"name": "probability", "shape": ["batch", 1, "depth", "height", "width"]},
            "operating_threshold": 0.5,
        },
        "training": {"data": "none", "synthetic": True, "command": "none"},
        "intended_use": "Benchmarks only.",
        "limitations": ["Random weights."],
        "sha256": sha256_of(onnx_path),
    }


def run_aidx(env: dict[str, str], data_dir: Path, study: Path, out: Path) -> dict[str, float]:
    aidx = str(Path(sys.executable).parent / "aidx")
    result = subprocess.run(
        [
            aidx,
            "--data-dir",
            str(data_dir),
            "infer",
            str(study),
            "--out",
            str(out),
            "--min-probability",
            "0.99",
        ],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"aidx infer failed: {result.stderr.strip()}")
    line = next(x for x in result.stdout.splitlines() if x.startswith("time:"))
    stages = {k: float(v) for k, v in re.findall(r"(\w+) ([0-9.]+) s", line)}
    stages["peak_mb"] = float(re.search(r"peak memory ([0-9.]+) MB", line).group(1))  # type: ignore[union-attr]
    return stages


def baseline_model_s(model: Any, array: np.ndarray) -> float:
    import torch
    from monai.inferers import sliding_window_inference

    tensor = torch.from_numpy(array)[None, None]
    start = time.perf_counter()
    with torch.inference_mode():
        sliding_window_inference(
            tensor, PATCH, 1, model, overlap=OVERLAP, mode="gaussian", sigma_scale=0.125
        )
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--features", type=int, default=8, help="BasicUNet width")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    )
    with tempfile.TemporaryDirectory(prefix="aidx-infer-bench-") as tmp:
        root = Path(tmp)
        study = generate(
            root / "study", PhantomOptions(seed=42, slices=args.slices, nodules=3)
        ).dicom_dir
        model = build_network(args.features)
        onnx_path = root / "model.onnx"
        export(model, onnx_path)
        (root / "card.json").write_text(
            json.dumps(card(onnx_path, args.features)), encoding="utf-8"
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("AIDX_")}
        env["AIDX_MODELS__DEFAULT"] = "bench-unet"
        aidx = str(Path(sys.executable).parent / "aidx")
        data = root / "data"
        for step in (
            ["register", str(onnx_path), "--card", str(root / "card.json")],
            ["promote", f"bench-unet@0.0.{args.features}"],
        ):
            subprocess.run(
                [aidx, "--data-dir", str(data), "models", *step],
                env=env,
                check=True,
                capture_output=True,
            )

        runs = [run_aidx(env, data, study, root / f"out{i}") for i in range(args.repeats)]
        volume = load_series(sorted(study.glob("*.dcm")))
        pre = preprocess(volume, PreprocessSpec(SPACING, HU_WINDOW))
        base = [baseline_model_s(model, pre.array) for _ in range(args.repeats)]

    med = statistics.median
    stage = {k: med(r[k] for r in runs) for k in runs[0]}
    print(
        f"study: {args.slices} x 512², model: BasicUNet features {args.features}, "
        f"spacing {SPACING} mm, patch {PATCH}, overlap {OVERLAP}, model input {pre.array.shape}"
    )
    print(f"medians over {args.repeats} runs:")
    print(
        "  aidx infer (ONNX Runtime CPU): total {total:.2f} s  [read {read:.2f}, preprocess "
        "{preprocess:.2f}, model {model:.2f}, postprocess {postprocess:.2f}, write {write:.2f}]"
        "  peak RSS {peak_mb:.0f} MB".format(**stage)
    )
    base_model = med(base)
    base_total = stage["total"] - stage["model"] + base_model
    print(
        f"  PyTorch eager + MONAI sliding window, model stage: {base_model:.2f} s "
        f"(whole study with the same other stages: {base_total:.2f} s)"
    )
    print(f"  model stage: aidx is {base_model / stage['model']:.2f}x faster   target >= 1.5x")
    print(
        f"  whole study: {stage['total']:.2f} s   target <= 10 s; "
        f"peak {stage['peak_mb']:.0f} MB   target <= 2048 MB"
    )


if __name__ == "__main__":
    main()
