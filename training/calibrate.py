"""Calibrate a registered model's finding probabilities (``aidx calibrate``); torch-free.

A segmentation network trained with Dice loss drives most voxels to 0 or 1, so the highest
voxel probability of a component (the finding's probability without calibration) is 1.0 for
many true and false findings alike, and a FROC curve cannot rank them. Calibration fits, by
logistic regression (Platt scaling, with a small L2 penalty), the probability that a component
is a nodule from two of its measurements: ln(1 + volume in mm³) of the region at the
segmentation threshold, and the logit of its highest voxel probability. The fit runs the serving
path (ONNX Runtime, the same preprocessing and postprocessing) over a canonical dataset that
neither training nor the evaluation used; a component is a nodule when its centre lies within a
nodule's radius (the LUNA16 rule the evaluation uses). The result goes into the model card
(``output.calibration``); the serving path then reports calibrated probabilities.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from inference.postprocess import findings_from_probability
from inference.preprocess import PreprocessSpec, preprocess
from inference.runner import OnnxRunner, RunnerOptions
from models.registry import Calibration, ModelEntry

from .dataset import Dataset
from .evaluate import case_as_volume

log = logging.getLogger("aidx.calibrate")

L2 = 1e-2  # ridge on the two slopes: keeps the fit finite when the classes separate


class CalibrationError(ValueError):
    """The calibration cannot be fitted; the message says why and what to change."""


@dataclass(frozen=True)
class Samples:
    features: NDArray[np.float64]  # (n, 2): ln(1 + volume mm³), logit(max probability)
    is_nodule: NDArray[np.bool_]  # (n,)
    cases: int
    nodules: int


def features(volume_mm3: float, max_probability: float) -> tuple[float, float]:
    p = min(max(max_probability, 1e-6), 1.0 - 1e-6)
    return math.log1p(volume_mm3), math.log(p / (1.0 - p))


def collect(
    model: ModelEntry,
    dataset_dir: Path,
    options: RunnerOptions,
    segmentation_threshold: float = 0.5,
    min_volume_mm3: float = 5.0,
    merge_distance_mm: float = 5.0,
) -> Samples:
    """Every component of every case, with its features and whether it is a nodule."""
    dataset = Dataset.load(dataset_dir)
    card = model.card
    spec = PreprocessSpec(card.input.spacing_mm, card.input.hu_window)
    runner = OnnxRunner(model.onnx_path, card, options)
    rows: list[tuple[float, float]] = []
    labels: list[bool] = []
    nodules = 0
    for case in dataset.cases:
        volume = case_as_volume(case, dataset_dir)
        pre = preprocess(volume, spec)
        found = findings_from_probability(
            runner.predict(pre.array),
            pre,
            volume,
            segmentation_threshold,
            min_volume_mm3,
            merge_distance_mm,
        )
        centres = np.array([les.center_mm for les in case.lesions], dtype=np.float64)
        radii = np.array([les.diameter_mm / 2.0 for les in case.lesions], dtype=np.float64)
        nodules += len(case.lesions)
        for f in found:
            rows.append(features(f.volume_mm3, f.probability))
            if len(radii):
                distance = np.linalg.norm(centres - np.asarray(f.center_mm), axis=1)
                labels.append(bool((distance <= radii).any()))
            else:
                labels.append(False)
        log.info("calibration case %s: %d components", case.id, len(found))
    return Samples(
        np.asarray(rows, dtype=np.float64).reshape(-1, 2),
        np.asarray(labels, dtype=bool),
        len(dataset.cases),
        nodules,
    )


def fit(samples: Samples, iterations: int = 100) -> tuple[float, float, float]:
    """Intercept and the two slopes of the logistic regression (Newton's method)."""
    y = samples.is_nodule.astype(np.float64)
    if y.sum() == 0 or y.sum() == len(y):
        raise CalibrationError(
            f"calibration needs both nodules and false positives among the components; got "
            f"{int(y.sum())} nodules of {len(y)} components: use more or other cases"
        )
    x = np.column_stack([np.ones(len(y)), samples.features])
    w = np.zeros(3)
    ridge = np.diag([0.0, L2, L2])
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-np.clip(x @ w, -50, 50)))
        gradient = x.T @ (p - y) + ridge @ w
        hessian = x.T @ (x * (p * (1 - p))[:, None]) + ridge + 1e-9 * np.eye(3)
        step = np.linalg.solve(hessian, gradient)
        w -= step
        if float(np.abs(step).max()) < 1e-10:
            break
    return float(w[0]), float(w[1]), float(w[2])


def calibrate(
    model: ModelEntry,
    dataset_dir: Path,
    options: RunnerOptions,
    segmentation_threshold: float = 0.5,
    min_volume_mm3: float = 5.0,
    merge_distance_mm: float = 5.0,
) -> tuple[Calibration, Samples]:
    samples = collect(
        model, dataset_dir, options, segmentation_threshold, min_volume_mm3, merge_distance_mm
    )
    intercept, volume_coef, max_coef = fit(samples)
    dataset = Dataset.load(dataset_dir)
    described = f"{dataset.name}: {samples.cases} cases, {samples.nodules} nodules"
    calibration = Calibration(
        segmentation_threshold=segmentation_threshold,
        intercept=intercept,
        volume_coef=volume_coef,
        max_coef=max_coef,
        fitted_on=f"{described}, {len(samples.is_nodule)} components "
        f"({int(samples.is_nodule.sum())} on nodules)",
    )
    return calibration, samples
