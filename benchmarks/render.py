"""Benchmark: the review app's slice renderer (``ui.viewer.StudyView``) on a 300 x 512² phantom
CT with its AI result, against plain windowing and PNG encoding of the same slices, in the same
run (the machines are shared and noisy).

The result comes from ``aidx infer``'s code path (``inference.pipeline.infer_files``) with the
stand-in ONNX model of the tests (``tests/standin_model.py``, which flags soft-tissue density):
besides the phantom's nodules it outlines the body wall, the mediastinum and the table, so every
slice carries large contours and several boxes; a harder case for the renderer than a real
detector's few nodules.

Prints the time to open the study (series, findings.json, SEG), then the median and p95 per
slice, scrolling through --renders slices spread over the series:

- baseline: the slice windowed to 8-bit grey and made RGB with plain numpy, no overlays;
- render without overlays, render with overlays (first visit of each slice, contours worked
  out then; and again, cached), with a finding selected;
- Pillow PNG encoding of the grey slice (baseline) and ``render_png`` with overlays.

Target (issue 7): a 512² slice with overlays in <= 100 ms on the server.

Usage: python benchmarks/render.py [--slices 300] [--renders 150] [--opens 2]
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

# Run as a script, this folder comes first on sys.path and its inference.py would shadow the
# `inference` package; drop it, and put the repository root first (for tests.standin_model).
_HERE = Path(__file__).resolve().parent
sys.path[:] = [str(_HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE]

from PIL import Image

from aidx.config import load_config
from inference.pipeline import infer_files
from models.registry import Registry
from tests.standin_model import install
from training.phantom import PhantomOptions, generate
from ui.viewer import WINDOW_PRESETS, StudyView

TARGET_MS = 100.0


def plain_window(hu: NDArray[np.float32], window: float, level: float) -> NDArray[np.uint8]:
    """The baseline: what any viewer does at least, windowing to grey, as RGB."""
    lo = level - window / 2
    gray = (np.clip((hu - lo) / window, 0.0, 1.0) * 255).astype(np.uint8)
    return np.stack([gray, gray, gray], axis=-1)


def png(rgb: NDArray[np.uint8]) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def timed_ms(fn: Callable[[int], object], slices: list[int]) -> list[float]:
    times = []
    for k in slices:
        start = time.perf_counter()
        fn(k)
        times.append((time.perf_counter() - start) * 1000.0)
    return times


def p95(values: list[float]) -> float:
    return float(np.percentile(values, 95))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--matrix", type=int, default=512)
    parser.add_argument("--renders", type=int, default=150, help="slices rendered per pass")
    parser.add_argument("--opens", type=int, default=2, help="times the study is opened")
    args = parser.parse_args()
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    )
    with tempfile.TemporaryDirectory(prefix="aidx-render-bench-") as tmp:
        root = Path(tmp)
        phantom = generate(
            root / "study",
            PhantomOptions(seed=42, slices=args.slices, matrix=args.matrix, nodules=3),
        )
        models = root / "models"
        model = Registry(models).resolve(None, install(models, root))
        config = load_config(env={}, overrides={"inference.min_volume_mm3": 50})
        files = sorted(phantom.dicom_dir.glob("*.dcm"))
        result = infer_files(files, root / "out", config, model)
        assert result.seg_path is not None, "the stand-in found nothing: no SEG to draw"

        opens = []
        for _ in range(args.opens):
            start = time.perf_counter()
            view = StudyView.open(phantom.dicom_dir, result.findings_path, result.seg_path)
            opens.append(time.perf_counter() - start)

    window, level = WINDOW_PRESETS["lung"]
    hu = view.volume.hu
    n = view.slice_count
    slices = sorted({round(i * (n - 1) / max(args.renders - 1, 1)) for i in range(args.renders)})
    drawn = [len(view.findings_on_slice(k)) for k in slices]
    selected = max(view.findings, key=lambda f: f.probability).id

    base = timed_ms(lambda k: plain_window(hu[k], window, level), slices)
    bare = timed_ms(lambda k: view.render(k, window, level, overlays=False), slices)
    cold = timed_ms(lambda k: view.render(k, window, level, selected_finding=selected), slices)
    warm = timed_ms(lambda k: view.render(k, window, level, selected_finding=selected), slices)
    base_png = timed_ms(lambda k: png(plain_window(hu[k], window, level)), slices)
    full_png = timed_ms(
        lambda k: view.render_png(k, window, level, selected_finding=selected), slices
    )
    thumbs = timed_ms(
        lambda i: view.thumbnail(view.findings[i].id), list(range(len(view.findings)))
    )

    med = statistics.median
    print(
        f"study: {n} x {hu.shape[1]}x{hu.shape[2]}, {len(view.findings)} findings "
        "(stand-in soft-tissue model), "
        f"{len(slices)} slices rendered per pass, {med(drawn):.0f} findings drawn per slice "
        f"(median, max {max(drawn)}); the most probable finding selected"
    )
    print(f"open (series + findings.json + SEG): median {med(opens):.2f} s over {args.opens}")
    print("per slice, ms            median     p95")
    rows = [
        ("baseline: window to RGB", base),
        ("render, no overlays", bare),
        ("render, overlays (cold)", cold),
        ("render, overlays (warm)", warm),
        ("baseline: window + PNG", base_png),
        ("render_png, overlays", full_png),
        ("thumbnail (per finding)", thumbs),
    ]
    for name, values in rows:
        print(f"  {name:<24} {med(values):7.2f} {p95(values):7.2f}")
    print(
        f"overlays vs baseline: {med(cold) / med(base):.1f}x cold, {med(warm) / med(base):.1f}x "
        f"warm; render_png vs window + PNG: {med(full_png) / med(base_png):.2f}x"
    )
    worst = max(p95(cold), p95(warm))
    verdict = "holds" if worst <= TARGET_MS else "FAILS"
    print(
        f"target <= {TARGET_MS:.0f} ms per 512² slice with overlays: p95 {worst:.1f} ms, {verdict}"
    )


if __name__ == "__main__":
    main()
