"""Benchmark: the recall ceiling of the two-stage detector's candidate stage, by nodule size.

For each case of a canonical dataset (``aidx dataset phantoms ...``): the serving path's
preprocessing onto the detector's grid, the lung mask and the blob candidates
(``inference.candidates``); a nodule counts as reachable at N candidates per scan when one of
the scan's N strongest candidates lies within its radius (LUNA16's hit rule), or within its
radius plus ``--slack`` mm (what the second stage's re-centring can still reach). Prints the
candidate recall at each N by LUNA16 size band and the median time of each step.

This is the number a ranking stage cannot move: a nodule with no candidate is never found.

Usage: python benchmarks/detector_ceiling.py aidx-data/datasets/phantoms-selection [--spacing 1.0]
       [--model lung-nodule@0.5.0] [--background-mm 9 13 17]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import models
from inference.candidates import CandidateSpec, find_candidates, lung_mask, probability_peaks
from inference.preprocess import PreprocessSpec, preprocess
from inference.runner import OnnxRunner, RunnerOptions
from models.registry import Registry
from training.dataset import Dataset
from training.evaluate import case_as_volume

BANDS = ((3.0, 6.0), (6.0, 10.0), (10.0, 20.0), (20.0, 31.0))
COUNTS = (10, 25, 50, 100, 200, 400)
MISSED = 10**9
NONE = np.zeros((0, 3))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", type=Path)
    parser.add_argument("--spacing", type=float, default=1.0)
    parser.add_argument(
        "--counts", type=int, nargs="+", default=list(COUNTS), help="candidates per scan"
    )
    parser.add_argument("--max-candidates", type=int, default=0, help="default: the largest count")
    parser.add_argument("--min-response", type=float, default=CandidateSpec.min_response)
    parser.add_argument("--slack", type=float, default=1.0, help="mm beyond the radius")
    parser.add_argument("--cases", type=int, default=0, help="only the first N cases")
    parser.add_argument(
        "--model",
        help="also rank a segmentation model's probability peaks (e.g. lung-nodule@0.5.0)",
    )
    parser.add_argument("--min-probability", type=float, default=0.002)
    parser.add_argument(
        "--shape-power",
        type=float,
        nargs="+",
        default=[CandidateSpec.shape_power],
        help="rankings to compare: response x roundness ** p",
    )
    parser.add_argument(
        "--background-mm",
        type=float,
        nargs="*",
        default=[],
        help="also the blobs of the image without its background (a top-hat by a cube this "
        "wide, detector.candidates.background_mm), ranked with the last --shape-power",
    )
    args = parser.parse_args()
    counts_at = sorted(args.counts)
    args.max_candidates = args.max_candidates or max(counts_at)
    dataset = Dataset.load(args.dataset)
    cases = dataset.cases[: args.cases] if args.cases else dataset.cases
    pre_spec = PreprocessSpec((args.spacing,) * 3, (-1000.0, 400.0))
    specs = [
        CandidateSpec(
            max_candidates=args.max_candidates, min_response=args.min_response, shape_power=p
        )
        for p in args.shape_power
    ]
    spec = specs[0]
    backgrounds = {
        width: CandidateSpec(
            max_candidates=args.max_candidates,
            min_response=args.min_response,
            shape_power=args.shape_power[-1],
            background_mm=width,
        )
        for width in args.background_mm
    }
    rows: dict[str, list[tuple[float, int, int]]] = {}  # diameter, rank, rank with slack
    times: dict[str, list[float]] = {"preprocess": [], "lungs": [], "candidates": []}
    runner = model_spec = None
    if args.model:
        registry = Registry(Path("aidx-data/models"), (Path(models.__file__).parent / "shipped",))
        model = registry.resolve(args.model, "lung-nodule")
        runner = OnnxRunner(model.onnx_path, model.card, RunnerOptions())
        model_spec = PreprocessSpec(model.card.input.spacing_mm, model.card.input.hu_window)
        times |= {"model preprocess": [], "model": []}
    counts: dict[str, list[int]] = {}
    for case in cases:
        volume = case_as_volume(case, args.dataset)
        t = time.perf_counter()
        pre = preprocess(volume, pre_spec)
        times["preprocess"].append(time.perf_counter() - t)
        t = time.perf_counter()
        lungs = lung_mask(pre.array, pre.body, args.spacing, spec, pre_spec.hu_window)
        times["lungs"].append(time.perf_counter() - t)
        ranked: dict[str, np.ndarray] = {}
        for power, power_spec in zip(args.shape_power, specs, strict=True):
            t = time.perf_counter()
            found = find_candidates(pre.array, lungs, args.spacing, power_spec)
            times["candidates"].append(time.perf_counter() - t)
            ranked[f"blob^{power:g}"] = pre.to_patient(found.index) if len(found) else NONE
        for width, width_spec in backgrounds.items():
            t = time.perf_counter()
            found = find_candidates(pre.array, lungs, args.spacing, width_spec)
            times.setdefault(f"top-hat {width:g} mm", []).append(time.perf_counter() - t)
            ranked[f"top{width:g}"] = pre.to_patient(found.index) if len(found) else NONE
        if runner is not None and model_spec is not None:
            t = time.perf_counter()
            mpre = preprocess(volume, model_spec)
            times["model preprocess"].append(time.perf_counter() - t)
            t = time.perf_counter()
            probability = runner.predict(mpre.array)
            times["model"].append(time.perf_counter() - t)
            peaks = probability_peaks(
                probability, model_spec.spacing_mm, args.min_probability, args.max_candidates
            )
            ranked["unet"] = mpre.to_patient(peaks.index) if len(peaks) else NONE
            ranked["unet+blob"] = interleave(
                ranked["unet"], ranked[f"blob^{args.shape_power[-1]:g}"]
            )
            for width in backgrounds:
                ranked[f"unet+top{width:g}"] = interleave(ranked["unet"], ranked[f"top{width:g}"])
        for name, centres in ranked.items():
            counts.setdefault(name, []).append(len(centres))
            for lesion in case.lesions:
                d = np.linalg.norm(centres - np.asarray(lesion.center_mm), axis=1)
                r = lesion.diameter_mm / 2.0
                strict = np.flatnonzero(d <= r)
                slack = np.flatnonzero(d <= r + args.slack)
                rows.setdefault(name, []).append(
                    (
                        lesion.diameter_mm,
                        int(strict[0]) if len(strict) else MISSED,
                        int(slack[0]) if len(slack) else MISSED,
                    )
                )
                if name == list(ranked)[-1] and (not len(slack) or slack[0] >= 100):
                    print(
                        f"  {case.id}: {lesion.diameter_mm:.1f} mm at "
                        f"{np.round(lesion.center_mm, 1).tolist()} rank "
                        f"{slack[0] if len(slack) else '-'}; nearest "
                        f"{d.min() if len(d) else -1:.1f} mm",
                        flush=True,
                    )
        print(f"{case.id}: " + ", ".join(f"{k} {len(v)}" for k, v in ranked.items()), flush=True)
    nodules = len(next(iter(rows.values())))
    print(f"\n{len(cases)} scans, {nodules} nodules, grid {args.spacing} mm")
    header = "band (mm)   n  " + "  ".join(f"@{n:<4}" for n in counts_at)
    for name, table in rows.items():
        print(f"\n{name}: candidates per scan median {statistics.median(counts[name]):.0f}")
        for label, column in (("within radius", 1), (f"within radius + {args.slack} mm", 2)):
            print(f"candidate recall, {label}:\n{header}")
            for lo, hi in (*BANDS, (3.0, 31.0)):
                sel = [r[column] for r in table if lo <= r[0] < hi]
                if sel:
                    recall = [sum(rank < n for rank in sel) / len(sel) for n in counts_at]
                    print(
                        f"{lo:>4.0f}-{hi:<4.0f} {len(sel):>4}  "
                        + "  ".join(f"{v:.3f}" for v in recall)
                    )
    print(
        "\nmedian seconds: "
        + ", ".join(f"{k} {statistics.median(v):.2f}" for k, v in times.items())
    )
    return 0


def interleave(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a[0], b[0], a[1], b[1], ...: N candidates drawn equally from two sources."""
    out: list[np.ndarray] = []
    for i in range(max(len(a), len(b))):
        out.extend(x[i] for x in (a, b) if i < len(x))
    return np.asarray(out, dtype=np.float64).reshape(-1, 3)


if __name__ == "__main__":
    raise SystemExit(main())
