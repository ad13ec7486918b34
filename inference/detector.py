"""The two-stage detector (torch-free): candidates, then a classifier on a crop around each.

The design of the leading LUNA16 systems, for the small nodules a segmentation network on a
coarse grid cannot see (a 4 mm nodule is a handful of its voxels):

1. **Grid.** The lungs are found on a coarse grid of the whole series; the series is cut to
   the lungs' box and preprocessed (``preprocess``, the one function) onto the detector's fine
   isotropic grid (``detector.spacing_mm``, e.g. 1 mm), so the fine grid costs the lungs, not
   the field of view.
2. **Candidates** (high recall, low precision, ``inference.candidates``): blobs at every scale
   inside the lungs (of the image without its background, a white top-hat, when the card's
   ``candidates.background_mm`` says so), ranked by response and roundness; and, when the
   card names a first-stage network (``model.onnx``, a segmentation network), the peaks of its
   probability map far below its operating point (it sees the large and ground-glass nodules
   that are faint blobs).
3. **Classifier** (``classifier.onnx``): two concentric crops around each candidate (32³ at the
   fine spacing, and twice the field at half the resolution, as two channels) give the
   probability that a nodule is there and its diameter.
4. **Findings.** The candidates above the floor, strongest first, each suppressing the weaker
   ones within its predicted radius (one nodule seen by several candidates is one finding; a
   small nodule beside a vessel or a larger nodule keeps its own), become one ``Finding`` each
   (``postprocess.findings_from_regions``): its mask the bright region around it (half-way
   between its centre's density and the lungs') within its predicted radius, its centre the
   place the classifier looked at, its probability the classifier's, its diameter the
   region's Feret diameter, its SEG mask on the series grid.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from models.registry import DetectorSpec, ModelCard, ModelEntry

from .candidates import (
    Candidates,
    CandidateSpec,
    bounding_box,
    find_candidates,
    lung_mask,
    probability_peaks,
)
from .findings import Finding
from .postprocess import Region, findings_from_regions
from .preprocess import Preprocessed, PreprocessSpec, preprocess
from .runner import OnnxRunner, RunnerOptions
from .volume import Volume

log = logging.getLogger("aidx.inference")

LUNGS_SPACING_MM = 4.0  # the grid on which the lungs' box is found
BOX_MARGIN_MM = 20.0  # around the lungs' box: a crop around a candidate at its edge stays real
PARENCHYMA_HU = -850.0
# the 8 flips of a batch of crops (batch, channel, z, y, x): every subset of the three axes
FLIPS: tuple[tuple[int, ...], ...] = ((), (2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4))


class DetectorError(ValueError):
    """The detector cannot run as its card says; the message says why."""


@dataclass
class DetectorInput:
    """The series on the detector's fine grid, cut to the lungs, and the lungs on it."""

    pre: Preprocessed
    lungs: NDArray[np.bool_]
    cut: Volume  # the series cut to the lungs' box (with a margin): what the network sees
    # the lungs' box in the cut's (k, row, column) indices: first and last corner, fractional
    lungs_box: NDArray[np.float64]
    timings: dict[str, float] = field(default_factory=dict)


def candidate_spec(spec: DetectorSpec) -> CandidateSpec:
    c = spec.candidates
    return CandidateSpec(
        sigmas_mm=tuple(c.sigmas_mm),
        min_response=c.min_response,
        max_candidates=c.max_candidates,
        shape_power=c.shape_power,
        lung_closing_mm=c.lung_closing_mm,
        lung_margin_mm=c.lung_margin_mm,
        background_mm=c.background_mm,
    )


def detector_input(
    volume: Volume, spec: DetectorSpec, hu_window: tuple[float, float]
) -> DetectorInput:
    """The series cut to its lungs' box and preprocessed onto the detector's grid (the same
    function for training and serving)."""
    timings: dict[str, float] = {}
    t = time.perf_counter()
    cspec = candidate_spec(spec)
    coarse = preprocess(volume, PreprocessSpec((LUNGS_SPACING_MM,) * 3, hu_window))
    lungs = lung_mask(coarse.array, coarse.body, LUNGS_SPACING_MM, cspec, hu_window, step=1)
    if not lungs.any():
        raise DetectorError("no lungs found in the series (is it a chest CT?)")
    box = bounding_box(lungs)
    lo = np.array([s.start for s in box], dtype=np.float64)
    hi = np.array([s.stop - 1 for s in box], dtype=np.float64)
    corners = np.array(
        [[a, b, c] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])]
    )
    patient = coarse.to_patient(corners)
    series_index = volume.to_index(patient)
    margin = BOX_MARGIN_MM / np.asarray(volume.spacing)
    start = np.maximum(np.floor(series_index.min(axis=0) - margin), 0).astype(int)
    stop = np.minimum(np.ceil(series_index.max(axis=0) + margin) + 1, volume.hu.shape).astype(int)
    cut = crop_volume(volume, start, stop)
    lungs_box = np.stack([series_index.min(axis=0), series_index.max(axis=0)]) - start
    timings["lungs_s"] = time.perf_counter() - t
    t = time.perf_counter()
    pre = preprocess(cut, PreprocessSpec((spec.spacing_mm,) * 3, hu_window), body=False)
    timings["fine_preprocess_s"] = time.perf_counter() - t
    # the coarse lungs onto the fine grid, by nearest voxel through patient coordinates
    t = time.perf_counter()
    inverse = np.linalg.inv(coarse.affine)
    to_coarse = inverse @ pre.affine  # fine (z, y, x, 1) -> coarse (z, y, x, 1)
    axes = [np.arange(n) for n in pre.array.shape]
    index = [
        np.clip(
            np.rint(to_coarse[i, i] * axes[i] + to_coarse[i, 3]).astype(int), 0, lungs.shape[i] - 1
        )
        for i in range(3)
    ]
    if not np.allclose(to_coarse[:3, :3], np.diag(np.diag(to_coarse[:3, :3])), atol=1e-6):
        raise DetectorError("the fine and coarse grids are not aligned")  # both are LPS grids
    fine_lungs = lungs[np.ix_(index[0], index[1], index[2])]
    timings["lungs_s"] += time.perf_counter() - t
    return DetectorInput(pre, np.ascontiguousarray(fine_lungs), cut, lungs_box, timings)


def network_cut(data: DetectorInput, margin_mm: float | None) -> Volume:
    """What the first-stage network sees: the lungs' box with ``margin_mm`` around it (the
    same arithmetic as the cut's), or the whole cut (None: ``BOX_MARGIN_MM``)."""
    if margin_mm is None:
        return data.cut
    if margin_mm > BOX_MARGIN_MM:
        raise DetectorError(
            f"the first-stage network's margin ({margin_mm:g} mm) is wider than the lungs' "
            f"cut ({BOX_MARGIN_MM:g} mm); set detector.candidates.network_margin_mm to at most "
            f"{BOX_MARGIN_MM:g}"
        )
    cut = data.cut
    margin = margin_mm / np.asarray(cut.spacing)
    start = np.maximum(np.floor(data.lungs_box[0] - margin), 0).astype(int)
    stop = np.minimum(np.ceil(data.lungs_box[1] + margin) + 1, cut.hu.shape).astype(int)
    return crop_volume(cut, start, stop)


def crop_volume(volume: Volume, start: NDArray[np.integer], stop: NDArray[np.integer]) -> Volume:
    """The part ``[start, stop)`` (k, row, column) of a series, with its geometry."""
    k0, r0, c0 = (int(v) for v in start)
    k1, r1, c1 = (int(v) for v in stop)
    origin = volume.to_patient(np.array([k0, r0, c0], dtype=np.float64))
    return Volume(
        hu=volume.hu[k0:k1, r0:r1, c0:c1],
        origin=origin,
        row_dir=volume.row_dir,
        col_dir=volume.col_dir,
        normal=volume.normal,
        spacing=volume.spacing,
        sop_uids=volume.sop_uids[k0:k1],
        study_uid=volume.study_uid,
        series_uid=volume.series_uid,
        frame_of_reference_uid=volume.frame_of_reference_uid,
    )


def crops(
    array: NDArray[np.float32], centres: NDArray[np.floating], size: int
) -> NDArray[np.float32]:
    """Two concentric crops around each centre (voxel indices), as channels: ``size``³ at the
    grid's spacing, and ``(2 size)``³ averaged down to ``size``³; outside the grid is 0 (air,
    the window's low end).

    The wide crop is a strided view of the grid's 2x2x2 block means, made once for all
    centres (the mean of each voxel's block reaching forward): per crop, a copy, not a mean
    over 262 144 voxels."""
    n = len(centres)
    out = np.zeros((n, 2, size, size, size), dtype=np.float32)
    if n == 0:
        return out
    pad = size
    padded = np.pad(array, pad, mode="constant", constant_values=0.0)
    at = np.rint(np.asarray(centres)).astype(int) + pad
    half = size // 2
    pooled = block_means(padded)
    for i, (z, y, x) in enumerate(at):
        out[i, 0] = padded[
            z - half : z - half + size, y - half : y - half + size, x - half : x - half + size
        ]
        out[i, 1] = pooled[tuple(slice(c - size, c + size, 2) for c in (z, y, x))]
    return out


def block_means(array: NDArray[np.float32]) -> NDArray[np.float32]:
    """``out[z, y, x]``: the mean of ``array[z:z+2, y:y+2, x:x+2]`` (one shorter along each
    axis), summed in float32 one axis at a time."""
    s = array[1:] + array[:-1]
    s = s[:, 1:] + s[:, :-1]
    s = s[:, :, 1:] + s[:, :, :-1]
    s *= np.float32(0.125)
    return s


class Classifier:
    """The second stage: an ONNX Runtime session of ``classifier.onnx``."""

    def __init__(self, path: Path, spec: DetectorSpec, options: RunnerOptions) -> None:
        import onnxruntime as ort  # noqa: PLC0415 - as the runner: loaded when a model is

        so = ort.SessionOptions()
        if options.intra_op_threads:
            so.intra_op_num_threads = options.intra_op_threads
        # TensorRT builds engines per shape: the classifier's batches vary; CUDA or CPU runs it
        available = set(ort.get_available_providers())
        providers = [
            p for p in options.providers if p in available and p != "TensorrtExecutionProvider"
        ] or ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(str(path), so, providers=providers)
        self.spec = spec
        self.batch = 64

    def score(self, batch: NDArray[np.float32]) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """(probability, diameter mm) of each crop pair."""
        name_in = self.spec.classifier.input.name
        probs: list[NDArray[np.float64]] = []
        diameters: list[NDArray[np.float64]] = []
        for i in range(0, len(batch), self.batch):
            out = self.session.run(None, {name_in: batch[i : i + self.batch]})[0]
            probs.append(np.asarray(out[:, 0], dtype=np.float64))
            diameters.append(np.asarray(out[:, 1], dtype=np.float64))
        if not probs:
            return np.zeros(0), np.zeros(0)
        return np.concatenate(probs), np.concatenate(diameters)


@dataclass
class Scored:
    """Candidates on the fine grid with the classifier's verdict."""

    index: NDArray[np.float64]
    probability: NDArray[np.float64]
    diameter_mm: NDArray[np.float64]
    source: NDArray[np.int8]  # 0 blob, 1 network


class Detector:
    """A two-stage model version, ready to detect (its sessions are reused across series)."""

    def __init__(
        self, model: ModelEntry, options: RunnerOptions | None = None, classifier: bool = True
    ) -> None:
        """``classifier=False``: the candidate stage only (training extracts its crops before
        there is a classifier)."""
        card = model.card
        if card.detector is None:
            raise DetectorError(f"model {model.ref} is not a two-stage detector")
        self.model = model
        self.card: ModelCard = card
        self.spec: DetectorSpec = card.detector
        self.options = options or RunnerOptions()
        overlap = self.spec.candidates.network_overlap
        network_options = (
            self.options if overlap is None else replace(self.options, overlap=overlap)
        )
        self.network = (
            OnnxRunner(model.onnx_path, card, network_options)
            if self.spec.candidates.network
            else None
        )
        self.classifier = (
            Classifier(model.folder / self.spec.classifier.file, self.spec, self.options)
            if classifier
            else None
        )
        self.provider = (
            self.network.provider if self.network is not None else "CPUExecutionProvider"
        )

    def candidates(self, data: DetectorInput) -> Candidates:
        """Blob candidates and (with a first-stage network) its probability peaks, as one list
        on the fine grid (network peaks first)."""
        t = time.perf_counter()
        cspec = candidate_spec(self.spec)
        blobs = find_candidates(data.pre.array, data.lungs, self.spec.spacing_mm, cspec)
        data.timings["candidates_s"] = time.perf_counter() - t
        if self.network is None:
            return blobs
        t = time.perf_counter()
        card = self.card
        # the network sees the lungs' box, not the field of view (a third to a half of it)
        coarse = preprocess(
            network_cut(data, self.spec.candidates.network_margin_mm),
            PreprocessSpec(card.input.spacing_mm, card.input.hu_window),
            body=False,
        )
        probability = self.network.predict(coarse.array)
        c = self.spec.candidates
        peaks = probability_peaks(
            probability, card.input.spacing_mm, c.network_min_probability, c.network_max_candidates
        )
        index = (
            fine_index(data.pre, coarse.to_patient(peaks.index)) if len(peaks) else np.zeros((0, 3))
        )
        inside = np.all((index >= 0) & (index <= np.asarray(data.pre.array.shape) - 1), axis=1)
        data.timings["network_s"] = time.perf_counter() - t
        return Candidates(
            np.concatenate([index[inside], blobs.index]),
            np.concatenate([np.full(int(inside.sum()), -1.0), blobs.radius_mm]),
            np.concatenate([peaks.response[inside], blobs.response]),
            np.concatenate([np.ones(int(inside.sum())), blobs.shape]),
        )

    def score(self, data: DetectorInput, found: Candidates) -> Scored:
        t = time.perf_counter()
        batch = crops(data.pre.array, found.index, self.spec.classifier.crop_size)
        if self.classifier is None:
            raise DetectorError(f"model {self.model.ref} was loaded without its classifier")
        probability, diameter = self.classifier.score(batch)
        top = self.spec.classifier.augment_top
        if top and len(probability):
            probability, diameter = self._augmented(batch, probability, diameter, top)
        data.timings["classifier_s"] = time.perf_counter() - t
        return Scored(found.index, probability, diameter, (found.radius_mm < 0).astype(np.int8))

    def _augmented(
        self,
        batch: NDArray[np.float32],
        probability: NDArray[np.float64],
        diameter: NDArray[np.float64],
        top: int,
    ) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """The ``top`` most probable crops scored in all 8 flips of their three axes, each
        verdict the mean of the 8 (the others keep their single score)."""
        assert self.classifier is not None
        best = np.argsort(-probability, kind="stable")[:top]
        p_sum, d_sum = probability[best].copy(), diameter[best].copy()
        for flips in FLIPS[1:]:
            p, d = self.classifier.score(np.ascontiguousarray(np.flip(batch[best], axis=flips)))
            p_sum += p
            d_sum += d
        probability, diameter = probability.copy(), diameter.copy()
        probability[best] = p_sum / len(FLIPS)
        diameter[best] = d_sum / len(FLIPS)
        return probability, diameter

    def detect(
        self,
        volume: Volume,
        floor: float,
        merge_distance_mm: float,
    ) -> tuple[list[Finding], dict[str, float]]:
        """Findings (probability at least ``floor``; none closer than ``merge_distance_mm`` or a
        stronger one's predicted radius to a stronger one) and the time each step took."""
        data = detector_input(volume, self.spec, self.card.input.hu_window)
        scored = self.score(data, self.candidates(data))
        t = time.perf_counter()
        above = np.flatnonzero(scored.probability >= floor)
        kept = above[
            suppress(
                scored.index[above],
                scored.probability[above],
                scored.diameter_mm[above],
                self.spec.spacing_mm,
                merge_distance_mm,
            )
        ]
        regions = [
            Region(
                float(scored.probability[i]),
                candidate_region(
                    data.pre, scored.index[i], scored.diameter_mm[i], self.card.input.hu_window
                ),
                scored.index[i],
            )
            for i in kept
        ]
        findings = findings_from_regions(distinct(regions, data.pre.array.shape), data.pre, volume)
        data.timings["findings_s"] = time.perf_counter() - t
        return findings, data.timings


def fine_index(pre: Preprocessed, points: NDArray[np.floating]) -> NDArray[np.float64]:
    """Fractional voxel indices on ``pre``'s grid of patient points."""
    p = np.asarray(points, dtype=np.float64) - pre.affine[:3, 3]
    return np.asarray(p @ np.linalg.inv(pre.affine[:3, :3]).T)


def suppress(
    index: NDArray[np.floating],
    probability: NDArray[np.floating],
    diameter_mm: NDArray[np.floating],
    spacing_mm: float,
    min_distance_mm: float,
) -> NDArray[np.intp]:
    """The candidates that are separate detections, strongest first: each suppresses the
    weaker ones whose centres lie within its predicted radius (at least ``min_distance_mm``),
    so one nodule seen by several candidates is one finding, and a small nodule beside a
    larger one keeps its own."""
    order = np.argsort(-np.asarray(probability), kind="stable")
    points = np.asarray(index, dtype=np.float64) * spacing_mm
    reach = np.maximum(np.asarray(diameter_mm, dtype=np.float64) / 2.0, min_distance_mm)
    gone = np.zeros(len(order), dtype=bool)
    kept: list[int] = []
    for i in order:
        if gone[i]:
            continue
        kept.append(int(i))
        gone |= np.linalg.norm(points - points[i], axis=1) < reach[i]
    return np.asarray(kept, dtype=np.intp)


def distinct(regions: list[Region], shape: tuple[int, ...]) -> list[Region]:
    """The regions (strongest first) whose centre no stronger region holds: a large nodule seen
    off-centre by candidates beyond its predicted radius is one finding, not three (on the demo
    study a 26.7 mm nodule came out as findings #3, #4 and #6)."""
    claimed = np.zeros(shape, dtype=bool)
    limit = np.asarray(shape) - 1
    out: list[Region] = []
    for region in sorted(regions, key=lambda r: -r.probability):
        at = region.centre if region.centre is not None else region.index.mean(axis=0)
        c = tuple(int(v) for v in np.clip(np.rint(at), 0, limit))
        if claimed[c]:
            continue
        claimed[tuple(region.index.T)] = True
        out.append(region)
    return out


def candidate_region(
    pre: Preprocessed,
    centre: NDArray[np.floating],
    diameter_mm: float,
    hu_window: tuple[float, float],
) -> NDArray[np.intp]:
    """The voxels (n, 3) of a detection on ``pre``'s grid: the bright region around its centre
    (above half-way between the centre's density and the lungs') within its predicted radius
    and a margin, connected to the centre, so a vessel through a nodule is cut at the
    nodule's edge; a ball of the predicted radius where nothing is brighter than the lungs."""
    array = pre.array
    spacing = float(np.linalg.norm(pre.affine[:3, 0]))
    w_lo, w_hi = hu_window
    parenchyma = float(np.clip((PARENCHYMA_HU - w_lo) / (w_hi - w_lo), 0.0, 1.0))
    radius_mm = max(1.5, float(diameter_mm) / 2.0) * 1.25 + spacing
    r = math.ceil(radius_mm / spacing)
    c = np.clip(np.rint(centre).astype(int), 0, np.asarray(array.shape) - 1)
    lo = np.maximum(c - r, 0)
    hi = np.minimum(c + r + 1, array.shape)
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
    local = array[box]
    zz, yy, xx = np.ogrid[
        tuple(slice(int(a) - int(cc), int(b) - int(cc)) for a, b, cc in zip(lo, hi, c, strict=True))
    ]
    distance2 = (zz * zz + yy * yy + xx * xx) * spacing * spacing
    ball = distance2 <= radius_mm * radius_mm
    at = tuple(int(v) for v in c - lo)
    core = ndimage.uniform_filter(local, size=3, mode="nearest")[at]
    level = (float(core) + parenchyma) / 2.0
    labels, count = ndimage.label((local >= level) & ball)
    if count:
        pick = labels[at]
        if pick == 0:  # the centre itself is dark (a ring, a cavity): the largest part
            sizes = np.bincount(labels.ravel())
            sizes[0] = 0
            pick = int(np.argmax(sizes))
        region = labels == pick
    else:
        region = distance2 <= (radius_mm / 1.25) ** 2
    return np.asarray(np.argwhere(region) + lo, dtype=np.intp)
