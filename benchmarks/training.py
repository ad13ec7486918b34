"""Benchmark: training throughput of the configured network, and its ONNX export parity.

Prints medians, and ratios against a baseline measured in the same run (machines are shared):

- training step: forward + backward + AdamW step of the network the config names, as
  training/train.py runs it (the U-Net body, Dice + cross-entropy on logits, AMP on GPU when the
  config asks), on random patches of the config's patch size; one step takes batch_size x
  samples_per_case patches (what one loader step gives). Samples/s, median of --steps steps
  after --warmup. The data pipeline (patch sampling, augmentation) is left out: this is the
  network's cost alone.
- baseline: the same step at batch 1; the ratio is what batching buys.
- export: the network (seeded random weights) exported with training.export.export_onnx to a
  temporary folder, which checks it against PyTorch: max abs/rel error per input, then the time
  per patch (the card's inference patch, batch 1) of ONNX Runtime and of PyTorch eager.

Usage: python benchmarks/training.py [--config configs/train/phantom.yaml] [--steps 3]
       [--warmup 1] [--repeats 5] [--batch N]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

# Run as a script, this folder comes first on sys.path and this file would shadow the
# `training` package; drop it (the repository root is found through the installed package).
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

REPO = _HERE.parent


def step_times(
    body: Any, batch: int, patch: tuple[int, int, int], steps: int, warmup: int, config: Any
) -> list[float]:
    """Seconds per training step of ``body`` at ``batch`` patches (after ``warmup`` steps)."""
    import torch
    from monai.losses.dice import DiceCELoss

    device = next(body.parameters()).device
    generator = torch.Generator().manual_seed(0)
    images = torch.rand((batch, 1, *patch), generator=generator).to(device)
    labels = (torch.rand((batch, 1, *patch), generator=generator) > 0.97).float().to(device)
    optimizer = torch.optim.AdamW(body.parameters(), lr=config.learning_rate)
    loss_fn = DiceCELoss(sigmoid=True)
    use_amp = config.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    body.train()
    times = []
    for n in range(warmup + steps):
        _sync(device)
        start = time.perf_counter()
        optimizer.zero_grad()
        with torch.autocast(device.type, enabled=use_amp):
            loss = loss_fn(body(images), labels)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        float(loss.detach())  # as the training loop does: waits for the step
        _sync(device)
        if n >= warmup:
            times.append(time.perf_counter() - start)
    return times


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def inference_times(run: Any, repeats: int) -> list[float]:
    run()  # warm-up (graph optimisation, allocations)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs/train/phantom.yaml")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--repeats", type=int, default=5, help="timed inference runs per engine")
    parser.add_argument(
        "--batch", type=int, help="patches per step (default: batch_size x samples_per_case)"
    )
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 0 or args.repeats < 1:
        parser.error("--steps and --repeats must be at least 1, --warmup at least 0")

    import onnxruntime as ort
    import torch

    from models.networks import build_network
    from training.export import INPUT_NAME, OUTPUT_NAME, ExportError, export_onnx
    from training.train import TrainConfig

    torch.set_num_threads(os.cpu_count() or 1)
    config = TrainConfig.load(args.config)
    patch = config.patch_size
    batch = args.batch or config.batch_size * config.samples_per_case
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores (load {load}), "
        f"Python {platform.python_version()}, torch {torch.__version__}, device {device}"
    )
    print(
        f"config {args.config}: {config.network}, features {config.features}, patch {patch}, "
        f"{batch} patches per step, AMP {'on' if config.amp and device.type == 'cuda' else 'off'}"
    )

    torch.manual_seed(config.seed)
    net = build_network(config.network, config.features).to(device)  # type: ignore[arg-type]
    med = statistics.median
    ours = step_times(net.body, batch, patch, args.steps, args.warmup, config)
    base = step_times(net.body, 1, patch, args.steps, args.warmup, config)
    ours_rate, base_rate = batch / med(ours), 1 / med(base)
    print(f"\ntraining step, medians of {args.steps} after {args.warmup} warm-up:")
    print(f"  batch {batch:>3}: {med(ours):.3f} s/step = {ours_rate:.2f} samples/s")
    print(f"  batch   1: {med(base):.3f} s/step = {base_rate:.2f} samples/s   (baseline)")
    print(f"  throughput ratio: {ours_rate / base_rate:.2f}x the baseline")

    net = net.cpu().eval()
    inference_patch = config.inference_patch_size or patch
    with tempfile.TemporaryDirectory(prefix="aidx-train-bench-") as tmp:
        path = Path(tmp) / "model.onnx"
        start = time.perf_counter()
        try:
            # The tracer's warnings (shape checks turned constants, InstanceNorm in "training"
            # mode, which uses the input's statistics either way) are what the parity check is
            # for; its figures below are the answer.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                report = export_onnx(net, path, inference_patch)
        except ExportError as exc:
            print(f"\nexport refused: {exc}")
            raise SystemExit(1) from exc
        export_s = time.perf_counter() - start
        print(f"\nONNX export with parity check: {export_s:.1f} s ({path.stat().st_size} bytes)")
        for c in report.comparisons:
            print(
                f"  {c.input_name:<20} {c.shape}: max abs error {c.max_abs_error:.2e}, "
                f"max rel error {c.max_rel_error:.2e}"
            )
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        array = np.random.default_rng(0).random((1, 1, *inference_patch), dtype=np.float32)
        tensor = torch.from_numpy(array)

        def run_ort() -> None:
            session.run([OUTPUT_NAME], {INPUT_NAME: array})

        def run_torch() -> None:
            with torch.inference_mode():
                net(tensor)

        ort_s = med(inference_times(run_ort, args.repeats))
        torch_s = med(inference_times(run_torch, args.repeats))
    print(f"inference per patch {inference_patch}, CPU, medians of {args.repeats}:")
    print(f"  ONNX Runtime:    {ort_s * 1000:.1f} ms")
    print(f"  PyTorch eager:   {torch_s * 1000:.1f} ms   (baseline)")
    print(f"  ONNX Runtime is {torch_s / ort_s:.2f}x the baseline's speed")


if __name__ == "__main__":
    main()
