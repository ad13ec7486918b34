"""Benchmark: `aidx infer` with real model versions on a 300 x 512² phantom CT, side by side.

Runs the whole command (a new process each time, as a user runs it) with each model on the same
study (the demo study of `aidx serve --demo`: its seed, 300 x 512², three nodules) and prints,
as medians over --repeats: the wall time of the command, the model stages (everything between
reading the series and writing the results: preprocessing, networks, candidates, classifier,
postprocessing), the steps each model reports, its peak RSS, and the ratio of each figure to
the first model's (the baseline, measured in the same run). Then each model's findings on the
study against its ground truth: the rank of each nodule and the false positives at the
operating threshold.

Budgets of the detector issue on the 2-core CPU: model stages <= 10 s, whole command <= 15 s,
peak RSS <= 2 GB.

Usage: python benchmarks/model_inference.py [lung-nodule@0.5.0 lung-nodule@0.6.0] [--repeats 3]
       python benchmarks/model_inference.py lung-nodule@0.6.0=../main lung-nodule@0.6.1  # code too
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

import numpy as np

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

from aidx.config import DemoConfig
from training.phantom import PhantomOptions, generate


def run(
    model: str, study: Path, out: Path, data_dir: Path, code: Path | None = None
) -> dict[str, float]:
    """One `aidx infer` (``code``: the checkout whose aidx runs, e.g. the code before a change;
    default: this one)."""
    aidx = str(Path(sys.executable).parent / "aidx")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIDX_")}
    if code is not None:
        env["PYTHONPATH"] = str(code.resolve())
    start = time.perf_counter()
    result = subprocess.run(
        [
            aidx,
            "--data-dir",
            str(data_dir),
            "infer",
            str(study),
            "--out",
            str(out),
            "--model",
            model.partition("=")[0],
        ],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"aidx infer --model {model} failed: {result.stderr.strip()[-2000:]}")
    line = next(x for x in result.stdout.splitlines() if x.startswith("time:"))
    steps = {k: float(v) for k, v in re.findall(r"(\w+) ([0-9.]+) s", line)}
    peak = re.search(r"peak memory ([0-9.]+) MB", line)
    assert peak is not None
    steps["model_stages"] = steps["total"] - steps.get("read", 0.0) - steps.get("write", 0.0)
    steps["command"] = wall
    steps["peak_mb"] = float(peak.group(1))
    return steps


def ranks(findings_path: Path, truth: list[dict[str, object]]) -> tuple[list[str], int]:
    """For each true nodule, the id of the first finding whose centre lies within its radius
    ('-' if none); and how many findings hit no nodule."""
    report = json.loads(findings_path.read_text(encoding="utf-8"))
    found = report["findings"]
    hits: list[str] = []
    used: set[int] = set()
    for nodule in truth:
        centre = np.asarray(nodule["center_mm"], dtype=float)
        radius = float(nodule["diameter_mm"]) / 2.0  # type: ignore[arg-type]
        hit = next(
            (
                f["id"]
                for f in found
                if np.linalg.norm(np.asarray(f["center_mm"]) - centre) <= radius
            ),
            None,
        )
        hits.append("-" if hit is None else f"#{hit}")
        if hit is not None:
            used.update(
                f["id"]
                for f in found
                if np.linalg.norm(np.asarray(f["center_mm"]) - centre) <= radius
            )
    return hits, sum(1 for f in found if f["id"] not in used)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "models",
        nargs="*",
        default=["lung-nodule@0.5.0", "lung-nodule"],
        help="model references; MODEL=DIR runs it with the code of the checkout DIR (the same "
        "model before and after a code change, side by side)",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--slices", type=int, default=DemoConfig().slices)
    parser.add_argument("--seed", type=int, default=DemoConfig().seed, help="default: the demo's")
    parser.add_argument("--data-dir", type=Path, default=Path("aidx-data"))
    args = parser.parse_args()
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    )
    med = statistics.median
    with tempfile.TemporaryDirectory(prefix="aidx-model-bench-") as tmp:
        root = Path(tmp)
        demo = DemoConfig()
        made = generate(
            root / "study",
            PhantomOptions(
                seed=args.seed, slices=args.slices, matrix=demo.matrix, nodules=demo.nodules
            ),
        )
        truth = made.ground_truth["nodules"]
        print(
            f"study: {args.slices} x 512², {len(truth)} nodules "
            + ", ".join(f"{n['diameter_mm']:.1f} mm" for n in truth)
        )
        results: dict[str, list[dict[str, float]]] = {m: [] for m in args.models}
        for _ in range(args.repeats):  # interleaved, so a slow moment hits every model alike
            for m in args.models:
                _, _, code = m.partition("=")
                out = root / f"{len(results[m])}-{args.models.index(m)}"
                results[m].append(
                    run(m, made.dicom_dir, out, args.data_dir, Path(code) if code else None)
                )
        base = args.models[0]
        print(f"medians over {args.repeats} runs (ratio to {base}):")
        for m in args.models:
            runs = results[m]
            figures = {k: med(r[k] for r in runs) for k in runs[0]}
            basef = {k: med(r[k] for r in results[base]) for k in results[base][0]}
            steps = ", ".join(
                f"{k} {v:.2f}"
                for k, v in figures.items()
                if k not in ("total", "command", "model_stages", "peak_mb")
            )
            print(
                f"  {m}: command {figures['command']:.2f} s "
                f"({figures['command'] / basef['command']:.2f}x), model stages "
                f"{figures['model_stages']:.2f} s "
                f"({figures['model_stages'] / basef['model_stages']:.2f}x), peak RSS "
                f"{figures['peak_mb']:.0f} MB ({figures['peak_mb'] / basef['peak_mb']:.2f}x)"
            )
            print(f"      steps (s): {steps}")
            first = root / f"0-{args.models.index(m)}" / "findings.json"
            hits, false_positives = ranks(first, truth)
            print(
                f"      nodules found as {', '.join(hits)}; false positives at the operating "
                f"threshold: {false_positives}"
            )
        print("budgets: model stages <= 10 s, command <= 15 s, peak RSS <= 2048 MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
