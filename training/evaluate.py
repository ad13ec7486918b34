"""Evaluate a registered model on a canonical dataset through the serving path (ONNX Runtime,
the same preprocessing and postprocessing as ``aidx infer``), with LUNA16-style FROC.

Torch-free: what is measured is what is served.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from inference.detector import Detector
from inference.postprocess import findings_from_probability
from inference.preprocess import PreprocessSpec, preprocess
from inference.runner import OnnxRunner, RunnerOptions
from inference.volume import Volume
from models.registry import ModelEntry

from .dataset import Case, Dataset, case_volume
from .froc import (
    SIZE_BANDS,
    Comparison,
    Detection,
    FrocError,
    FrocReport,
    Nodule,
    Scan,
    compare,
    evaluate,
    plot_froc,
)
from .froc_io import build_scans, load_ground_truth, read_detections_csv, write_detections_csv

log = logging.getLogger("aidx.evaluate")

# LUNA16's size bands, and all nodules of 6 mm and more (the default model's target band).
EVALUATION_BANDS = (*SIZE_BANDS, (6.0, 100.0))


@dataclass(frozen=True)
class Evaluation:
    report: FrocReport
    json_path: Path
    png_path: Path
    detections_path: Path  # every detection, LUNA16 submission CSV (for `aidx compare`)


def case_as_volume(case: Case, root: Path) -> Volume:
    """A dataset case as the serving path's Volume (slices along +z, rows +y, columns +x)."""
    hu, affine = case_volume(case, root)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    axes = affine[:3, :3] / spacing
    return Volume(
        hu=hu,
        origin=affine[:3, 3].copy(),
        row_dir=axes[:, 2].copy(),
        col_dir=axes[:, 1].copy(),
        normal=axes[:, 0].copy(),
        spacing=(float(spacing[0]), float(spacing[1]), float(spacing[2])),
        sop_uids=tuple(f"{case.id}.{k}" for k in range(hu.shape[0])),
        study_uid=case.id,
        series_uid=case.id,
        frame_of_reference_uid="",
    )


def evaluate_model(
    model: ModelEntry,
    dataset_dir: Path,
    out_dir: Path,
    options: RunnerOptions,
    min_probability: float = 0.05,
    min_volume_mm3: float = 5.0,
    merge_distance_mm: float = 5.0,
    bootstrap: int = 100,
) -> Evaluation:
    """Detect on every case (down to ``min_probability``, so that the FROC curve has its low
    thresholds) and write ``froc.json``, ``froc.png`` and ``detections.csv`` into ``out_dir``."""
    dataset = Dataset.load(dataset_dir)
    card = model.card
    spec = PreprocessSpec(card.input.spacing_mm, card.input.hu_window)
    detector = Detector(model, options) if card.detector is not None else None
    runner = OnnxRunner(model.onnx_path, card, options) if detector is None else None
    # A calibrated model's components are fixed by its segmentation threshold; the floor then
    # applies to calibrated probabilities, which spread lower: keep nearly all of them so the
    # FROC curve reaches its high false-positive rates.
    floor = min_probability if card.output.calibration is None else min(min_probability, 1e-4)
    if detector is not None:
        floor = min(min_probability, 1e-3)  # the classifier's probabilities, down to the FROC's end
    scans = []
    for case in dataset.cases:
        volume = case_as_volume(case, dataset_dir)
        if detector is not None:
            findings, _ = detector.detect(volume, floor, merge_distance_mm)
        else:
            assert runner is not None
            pre = preprocess(volume, spec)
            probability = runner.predict(pre.array)
            findings = findings_from_probability(
                probability,
                pre,
                volume,
                floor,
                min_volume_mm3,
                merge_distance_mm,
                calibration=card.output.calibration,
            )
        scans.append(
            Scan(
                id=case.id,
                nodules=tuple(Nodule(les.center_mm, les.diameter_mm) for les in case.lesions),
                detections=tuple(Detection(f.center_mm, f.probability) for f in findings),
            )
        )
        log.info("evaluated case %s: %d detections", case.id, len(findings))
    report = evaluate(scans, size_bands=EVALUATION_BANDS, bootstrap=bootstrap)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out_dir / "froc.json", out_dir / "froc.png"
    detections_path = out_dir / "detections.csv"
    report.write(json_path)
    plot_froc(report, png_path)
    write_detections_csv(scans, detections_path)
    return Evaluation(report, json_path, png_path, detections_path)


def compare_evaluations(
    dataset_dir: Path, a_dir: Path, b_dir: Path, bootstrap: int = 1000, seed: int = 0
) -> Comparison:
    """Compare two ``aidx evaluate`` outputs (their ``detections.csv``) on the dataset both
    were evaluated on, with a paired bootstrap over its scans."""
    truth = load_ground_truth(dataset_dir / "dataset.json")
    scans = []
    for folder in (a_dir, b_dir):
        csv = folder / "detections.csv"
        if not csv.is_file():
            raise FrocError(
                f"{csv} not found: compare takes folders written by `aidx evaluate --out` "
                "(evaluate again to get the detections file)"
            )
        scans.append(build_scans(truth, read_detections_csv(csv), missing_ok=True))
    return compare(scans[0], scans[1], bootstrap=bootstrap, seed=seed)
