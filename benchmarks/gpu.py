"""Everything GPU-related in one call (for a lent GPU machine): which ONNX Runtime providers
exist, the card's name, the model time per study with TensorRT, CUDA and CPU on the same
preprocessed phantom and the same network as benchmarks/inference.py, and the training step
throughput of configs/train/phantom.yaml on the GPU (AMP) against the CPU in the same run.
Where ONNX Runtime has no CUDA provider (onnxruntime-gpu is a 243 MiB wheel, more than a lent
machine's 64 MiB carry limit), the same network's model time on the GPU is measured with PyTorch
(sliding window of the card's patch, fp32 and AMP; whole volume) as the nearest real figure.

Target: <= 0.5 s of model time per study with the CUDA or TensorRT provider.
Usage: python benchmarks/gpu.py [--repeats 5] [--features 8] [--train-steps 5]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# The repository root instead of this folder (whose inference.py would shadow the package).
_HERE = Path(__file__).resolve().parent
sys.path[:] = [str(_HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import onnxruntime as ort

from benchmarks.inference import HU_WINDOW, SPACING, build_network, card, export
from inference.preprocess import PreprocessSpec, preprocess
from inference.runner import OnnxRunner, RunnerOptions
from inference.volume import load_series
from models.registry import ModelCard
from training.phantom import PhantomOptions, generate


def gpu_name() -> str:
    if shutil.which("nvidia-smi") is None:
        return "no nvidia-smi"
    out = subprocess.run(
        ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
        capture_output=True,
        text=True,
        check=False,
    )
    return out.stdout.strip() or out.stderr.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--features", type=int, default=8)
    parser.add_argument("--train-steps", type=int, default=5, help="0 skips the training part")
    args = parser.parse_args()
    available = ort.get_available_providers()
    print(f"GPU: {gpu_name()}")
    print(f"onnxruntime {ort.__version__}, providers: {', '.join(available)}")
    with tempfile.TemporaryDirectory(prefix="aidx-gpu-") as tmp:
        root = Path(tmp)
        study = generate(root / "study", PhantomOptions(seed=42, nodules=3)).dicom_dir
        onnx_path = root / "model.onnx"
        export(build_network(args.features), onnx_path)
        model_card = ModelCard.model_validate(
            json.loads(json.dumps(card(onnx_path, args.features)))
        )
        pre = preprocess(
            load_series(sorted(study.glob("*.dcm"))), PreprocessSpec(SPACING, HU_WINDOW)
        )
        print(f"model input {pre.array.shape} (spacing {SPACING} mm)")
        for provider in (
            "TensorrtExecutionProvider",
            "CUDAExecutionProvider",
            "CPUExecutionProvider",
        ):
            if provider not in available:
                print(f"  {provider}: not available")
                continue
            for mode in ("sliding", "whole"):
                options = RunnerOptions(
                    providers=(provider,), mode=mode, io_binding=provider != "CPUExecutionProvider"
                )
                try:
                    runner = OnnxRunner(onnx_path, model_card, options)
                    runner.predict(pre.array)  # warm-up (TensorRT builds its engine here)
                    times = []
                    for _ in range(args.repeats):
                        start = time.perf_counter()
                        runner.predict(pre.array)
                        times.append(time.perf_counter() - start)
                except Exception as exc:  # noqa: BLE001 - report and go on with the next provider
                    print(f"  {provider} {mode}: failed: {exc}")
                    continue
                print(
                    f"  {provider} {mode}: model time median {statistics.median(times):.3f} s "
                    f"(min {min(times):.3f}) on {runner.provider}   target <= 0.5 s on GPU"
                )
        torch_cuda_inference(pre.array, args.features, args.repeats)
    if args.train_steps:
        training_throughput(args.train_steps)


def torch_cuda_inference(array: Any, features: int, repeats: int) -> None:
    """Model time of the benchmark network on the GPU through PyTorch (MONAI's sliding window,
    the same patch, overlap and Gaussian weighting as the ONNX runner)."""
    try:
        import torch
        from monai.inferers.utils import sliding_window_inference
    except ImportError as exc:
        print(f"  PyTorch CUDA: skipped ({exc})")
        return
    if not torch.cuda.is_available():
        print("  PyTorch CUDA: no CUDA device")
        return
    from benchmarks.inference import PATCH

    net = build_network(features).cuda()
    image = torch.from_numpy(array[None, None].astype("float32")).cuda()
    torch.backends.cudnn.benchmark = True

    def sliding(amp: bool) -> None:
        with torch.inference_mode(), torch.autocast("cuda", enabled=amp):
            sliding_window_inference(
                image, PATCH, 8, net, overlap=0.25, mode="gaussian", sigma_scale=0.125
            )

    def whole(amp: bool) -> None:
        shape = [int(-(-n // 16) * 16) for n in image.shape[2:]]
        padded = torch.nn.functional.pad(
            image,
            [
                0,
                shape[2] - image.shape[4],
                0,
                shape[1] - image.shape[3],
                0,
                shape[0] - image.shape[2],
            ],
        )
        with torch.inference_mode(), torch.autocast("cuda", enabled=amp):
            net(padded)

    for name, fn in (("sliding", sliding), ("whole", whole)):
        for amp in (False, True):
            fn(amp)
            torch.cuda.synchronize()
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                fn(amp)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
            label = "AMP" if amp else "fp32"
            print(
                f"  PyTorch CUDA {name} {label}: model time median "
                f"{statistics.median(times):.3f} s "
                f"(min {min(times):.3f})   target <= 0.5 s on GPU"
            )


def training_throughput(steps: int) -> None:
    """Samples/s of a training step (configs/train/phantom.yaml) on CUDA and on the CPU."""
    try:
        import torch

        from benchmarks.training import step_times
        from models.networks import build_network as build_train_network
        from training.train import TrainConfig
    except ImportError as exc:
        print(f"training: skipped ({exc}; needs the [train] extra)")
        return
    config = TrainConfig.load(_HERE.parent / "configs/train/phantom.yaml")
    batch = config.batch_size * config.samples_per_case
    devices = ["cuda", "cpu"] if torch.cuda.is_available() else ["cpu"]
    rates = {}
    for name in devices:
        net = build_train_network(config.network, config.features).to(name)  # type: ignore[arg-type]
        times = step_times(net.body, batch, config.patch_size, steps, 1, config)
        rates[name] = batch / statistics.median(times)
        amp = " (AMP)" if name == "cuda" and config.amp else ""
        print(f"training {name}{amp}: {rates[name]:.1f} samples/s, patch {config.patch_size}")
    if "cuda" in rates:
        print(f"training: GPU {rates['cuda'] / rates['cpu']:.1f}x the CPU in this run")


if __name__ == "__main__":
    main()
