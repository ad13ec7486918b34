"""Benchmark: writing a 300 x 512² synthetic chest CT, against pydicom writing the same pixels.

Prints medians over repeated runs, and ratios against a baseline measured in the same run (the
machines are shared and noisy):

- the whole phantom (plan, render, write; ``aidx phantom``), target <= 10 s on 2 cores;
- pydicom alone writing the same pixels with a minimal CT header, one process (the baseline);
- aidx's series writer writing the same pixels, one process, target <= 2x the baseline.

Usage: python benchmarks/phantom.py [--repeats 3] [--slices 300] [--matrix 512] [--workers N]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom
from numpy.typing import NDArray
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from training.phantom import PhantomOptions, generate
from training.phantom.dicom_writer import SeriesWriter
from training.phantom.generator import make_plan


def pydicom_alone(pixels: list[NDArray[np.uint16]], out: Path) -> float:
    """Write the pixels as CT slices with pydicom and the fewest attributes a viewer needs."""
    start = time.perf_counter()
    study, series = generate_uid(), generate_uid()
    for i, frame in enumerate(pixels):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.Modality = "CT"
        ds.InstanceNumber = i + 1
        ds.Rows, ds.Columns = frame.shape
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleIntercept, ds.RescaleSlope = "-1024", "1"
        ds.PixelData = frame.tobytes()
        ds.save_as(out / f"{i:06d}.dcm", enforce_file_format=True)
    return time.perf_counter() - start


def aidx_writer(pixels: list[NDArray[np.uint16]], out: Path, options: PhantomOptions) -> float:
    """Write the same pixels with the phantom's own series writer (full CT header)."""
    plan = make_plan(options)
    writer = SeriesWriter(plan.header, out)
    start = time.perf_counter()
    for k, frame in enumerate(pixels):
        writer.write(k + 1, plan.sop_uids[k], float(plan.scene.grid.z[k]), frame)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--matrix", type=int, default=512)
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args()

    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    )
    totals, plans, renders, baselines, writers = [], [], [], [], []
    for repeat in range(args.repeats):
        options = PhantomOptions(
            seed=1000 + repeat, slices=args.slices, matrix=args.matrix, workers=args.workers
        )
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            result = generate(root / "phantom", options)
            totals.append(result.timings["total_s"])
            plans.append(result.timings["plan_s"])
            renders.append(result.timings["render_write_s"])
            pixels = [pydicom.dcmread(f).pixel_array for f in result.files]
            (root / "baseline").mkdir()
            baselines.append(pydicom_alone(pixels, root / "baseline"))
            (root / "writer").mkdir()
            writers.append(aidx_writer(pixels, root / "writer", options))
        print(
            f"  run {repeat + 1}: phantom {totals[-1]:.2f} s, pydicom alone {baselines[-1]:.2f} s,"
            f" aidx writer {writers[-1]:.2f} s"
        )

    med = statistics.median
    shape = f"{args.slices}x{args.matrix}x{args.matrix}"
    workers = int(result.timings["workers"])
    print(f"\nmedians over {args.repeats} runs ({shape}):")
    print(
        f"  aidx phantom (whole job, {workers} workers): {med(totals):.2f} s"
        f"  [plan {med(plans):.2f} s, render+write {med(renders):.2f} s]   target <= 10 s"
    )
    print(f"  pydicom alone, same pixels (1 process):    {med(baselines):.2f} s   (baseline)")
    print(
        f"  aidx series writer, same pixels (1 process): {med(writers):.2f} s"
        f" = {med(writers) / med(baselines):.2f}x baseline   target <= 2x"
    )
    print(f"  whole phantom / baseline: {med(totals) / med(baselines):.1f}x")


if __name__ == "__main__":
    main()
