"""LUNA16-style FROC evaluation of nodule detections: curve, sensitivities, CPM, size bands.

Follows the LUNA16 challenge's evaluation script (``noduleCADEvaluationLUNA16.py``), with one
deliberate difference noted below:

- A detection hits a nodule when its centre lies within the nodule's radius, distance <= d/2
  (the LUNA16 script tests ``<``; a detection exactly on the boundary counts here).
- A nodule counts once, with its highest-probability hit; further hits on it are not FPs. A
  detection may hit two nodules and counts for both, as in LUNA16.
- Detections hitting an excluded ("irrelevant") nodule and no counted nodule are neither TP nor FP.
- The FROC curve has one point per distinct detection probability t (keep detections with
  probability >= t): average FPs per scan and the fraction of nodules hit, starting from (0, 0).
- The sensitivity at an FP rate is ``np.interp`` on that curve (linear between points; where the
  curve rises vertically, the upper value; beyond its last point, its last sensitivity), as the
  LUNA16 script does. CPM is the mean at 1/8, 1/4, 1/2, 1, 2, 4 and 8 FPs per scan.
- Size bands share the FP axis (an FP has no size): a band's sensitivity at a rate is the same
  interpolation on the band's own sensitivity curve.

Torch-free: numpy, and Pillow for the PNG figure only.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

Point = tuple[float, float, float]
FloatArray = NDArray[np.float64]

FORMAT = "aidx-froc/1"
OPERATING_POINTS: tuple[float, ...] = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
# Half-open [low, high) diameter bands in mm.
SIZE_BANDS: tuple[tuple[float, float], ...] = ((3.0, 6.0), (6.0, 10.0), (10.0, 20.0), (20.0, 30.0))


class FrocError(ValueError):
    """Inputs that cannot be evaluated; the message says which scan or file and what to fix."""


def as_point(values: Any, what: str) -> Point:
    try:
        x, y, z = (float(v) for v in values)
    except (TypeError, ValueError) as exc:
        raise FrocError(f"{what}: center_mm must be 3 numbers, got {values!r}") from exc
    if not all(math.isfinite(v) for v in (x, y, z)):
        raise FrocError(f"{what}: center_mm must be finite, got {values!r}")
    return (x, y, z)


@dataclass(frozen=True)
class Nodule:
    """A ground-truth nodule: centre in LPS mm and diameter in mm."""

    center_mm: Point
    diameter_mm: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.diameter_mm) and self.diameter_mm > 0):
            raise FrocError(f"nodule at {self.center_mm}: diameter_mm must be > 0")


@dataclass(frozen=True)
class Detection:
    """A detection: centre in LPS mm and probability in 0..1."""

    center_mm: Point
    probability: float

    def __post_init__(self) -> None:
        if not 0.0 <= self.probability <= 1.0:  # also rejects NaN
            raise FrocError(f"detection at {self.center_mm}: probability {self.probability}")


@dataclass(frozen=True)
class Scan:
    """One scan's truth and detections. ``exclude``: nodules whose hits are neither TP nor FP."""

    id: str
    nodules: tuple[Nodule, ...]
    detections: tuple[Detection, ...]
    exclude: tuple[Nodule, ...] = ()


@dataclass(frozen=True)
class _Matched:
    """One scan after matching: each nodule's best hit probability (NaN if missed), FP scores."""

    nodule_scores: FloatArray
    nodule_diameters: FloatArray
    fp_scores: FloatArray
    ignored: int


def _hits(centers: FloatArray, nodules: Sequence[Nodule]) -> NDArray[np.bool_]:
    """hits[i, j]: detection j lies within nodule i's radius (distance <= d/2)."""
    if not nodules or len(centers) == 0:
        return np.zeros((len(nodules), len(centers)), dtype=bool)
    nod = np.array([n.center_mm for n in nodules], dtype=np.float64)
    radius = np.array([n.diameter_mm / 2.0 for n in nodules], dtype=np.float64)
    dist2 = ((nod[:, None, :] - centers[None, :, :]) ** 2).sum(axis=2)
    return np.asarray(dist2 <= (radius**2)[:, None])


def _match(scan: Scan) -> _Matched:
    centers = np.array([d.center_mm for d in scan.detections], dtype=np.float64).reshape(-1, 3)
    probs = np.array([d.probability for d in scan.detections], dtype=np.float64)
    hits = _hits(centers, scan.nodules)
    excluded_hits = _hits(centers, scan.exclude)
    scores = np.where(hits, probs[None, :], -np.inf).max(axis=1, initial=-np.inf)
    scores[np.isneginf(scores)] = np.nan
    counted = hits.any(axis=0)
    ignored = excluded_hits.any(axis=0) & ~counted
    return _Matched(
        nodule_scores=scores,
        nodule_diameters=np.array([n.diameter_mm for n in scan.nodules], dtype=np.float64),
        fp_scores=probs[~counted & ~ignored],
        ignored=int(ignored.sum()),
    )


def _at_or_above(sorted_scores: FloatArray, thresholds: FloatArray) -> FloatArray:
    """How many of ``sorted_scores`` (ascending, NaN-free) are >= each threshold."""
    below = np.searchsorted(sorted_scores, thresholds, side="left")
    return (len(sorted_scores) - below).astype(np.float64)


def _curve(
    nodule_scores: FloatArray, fp_scores: FloatArray, n_scans: int
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """FROC points (fps, sensitivity, threshold), one per distinct score, thresholds descending."""
    hit = np.sort(nodule_scores[~np.isnan(nodule_scores)])
    fp = np.sort(fp_scores)
    thresholds = np.unique(np.concatenate([hit, fp]))[::-1]
    fps = _at_or_above(fp, thresholds) / n_scans
    sens = _at_or_above(hit, thresholds) / len(nodule_scores)
    return fps, sens, thresholds


def _interp(rates: Sequence[float], fps: FloatArray, sens: FloatArray) -> FloatArray:
    """Sensitivity at each FP rate: np.interp on the curve with the origin prepended."""
    xs = np.concatenate([[0.0], fps])
    ys = np.concatenate([[0.0], sens])
    return np.asarray(np.interp(np.asarray(rates, dtype=np.float64), xs, ys), dtype=np.float64)


def _cpm(
    nodule_scores: FloatArray, fp_scores: FloatArray, n_scans: int, rates: Sequence[float]
) -> float:
    fps, sens, _ = _curve(nodule_scores, fp_scores, n_scans)
    return float(_interp(rates, fps, sens).mean())


@dataclass(frozen=True)
class BandResult:
    """Sensitivity for nodules with low_mm <= diameter < high_mm; None where the band is empty."""

    low_mm: float
    high_mm: float
    n_nodules: int
    sensitivity: float | None


@dataclass(frozen=True)
class FrocReport:
    """Everything one FROC evaluation found. Curve points exclude the (0, 0) origin."""

    n_scans: int
    n_nodules: int
    n_detected: int
    n_false_positives: int
    n_ignored: int
    operating_points: tuple[float, ...]
    sensitivities: tuple[float, ...]
    cpm: float
    curve_fps: tuple[float, ...]
    curve_sensitivity: tuple[float, ...]
    curve_thresholds: tuple[float, ...]
    band_fp_rate: float | None
    size_bands: tuple[BandResult, ...]
    bootstrap_samples: int
    bootstrap_seed: int
    confidence: float
    cpm_ci: tuple[float, float] | None

    def sensitivity_at(self, fp_rate: float) -> float:
        fps = np.array(self.curve_fps, dtype=np.float64)
        sens = np.array(self.curve_sensitivity, dtype=np.float64)
        return float(_interp([fp_rate], fps, sens)[0])

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "n_scans": self.n_scans,
            "n_nodules": self.n_nodules,
            "n_detected": self.n_detected,
            "n_false_positives": self.n_false_positives,
            "n_ignored": self.n_ignored,
            "operating_points": list(self.operating_points),
            "sensitivities": list(self.sensitivities),
            "cpm": self.cpm,
            "curve": {
                "fps": list(self.curve_fps),
                "sensitivity": list(self.curve_sensitivity),
                "thresholds": list(self.curve_thresholds),
            },
            "band_fp_rate": self.band_fp_rate,
            "size_bands": [
                {
                    "low_mm": b.low_mm,
                    "high_mm": b.high_mm,
                    "n_nodules": b.n_nodules,
                    "sensitivity": b.sensitivity,
                }
                for b in self.size_bands
            ],
            "bootstrap": {
                "samples": self.bootstrap_samples,
                "seed": self.bootstrap_seed,
                "confidence": self.confidence,
                "cpm_ci": None if self.cpm_ci is None else list(self.cpm_ci),
            },
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> FrocReport:
        try:
            if data["format"] != FORMAT:
                raise FrocError(f"not a {FORMAT} report: format {data['format']!r}")
            boot = data["bootstrap"]
            ci = boot["cpm_ci"]
            return cls(
                n_scans=int(data["n_scans"]),
                n_nodules=int(data["n_nodules"]),
                n_detected=int(data["n_detected"]),
                n_false_positives=int(data["n_false_positives"]),
                n_ignored=int(data["n_ignored"]),
                operating_points=tuple(float(v) for v in data["operating_points"]),
                sensitivities=tuple(float(v) for v in data["sensitivities"]),
                cpm=float(data["cpm"]),
                curve_fps=tuple(float(v) for v in data["curve"]["fps"]),
                curve_sensitivity=tuple(float(v) for v in data["curve"]["sensitivity"]),
                curve_thresholds=tuple(float(v) for v in data["curve"]["thresholds"]),
                band_fp_rate=None if data["band_fp_rate"] is None else float(data["band_fp_rate"]),
                size_bands=tuple(
                    BandResult(
                        low_mm=float(b["low_mm"]),
                        high_mm=float(b["high_mm"]),
                        n_nodules=int(b["n_nodules"]),
                        sensitivity=None if b["sensitivity"] is None else float(b["sensitivity"]),
                    )
                    for b in data["size_bands"]
                ),
                bootstrap_samples=int(boot["samples"]),
                bootstrap_seed=int(boot["seed"]),
                confidence=float(boot["confidence"]),
                cpm_ci=None if ci is None else (float(ci[0]), float(ci[1])),
            )
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            if isinstance(exc, FrocError):
                raise
            raise FrocError(f"not a FROC report: {exc!r}") from exc

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n", encoding="utf-8")


def evaluate(
    scans: Sequence[Scan],
    *,
    operating_points: Sequence[float] = OPERATING_POINTS,
    size_bands: Sequence[tuple[float, float]] = SIZE_BANDS,
    band_fp_rate: float | None = 1.0,
    bootstrap: int = 100,
    seed: int = 0,
    confidence: float = 0.95,
) -> FrocReport:
    """FROC over ``scans``. ``band_fp_rate=None``: size bands at the full curve's end (all
    detections kept). ``bootstrap=0`` turns the CPM confidence interval off; otherwise scans are
    resampled with replacement (seeded) and the interval is the percentile interval."""
    if not scans:
        raise FrocError("no scans to evaluate")
    ids = [s.id for s in scans]
    if len(set(ids)) != len(ids):
        raise FrocError("scan ids repeat; each scan must appear once")
    if bootstrap < 0 or not 0.0 < confidence < 1.0:
        raise FrocError("bootstrap must be >= 0 and confidence in (0, 1)")
    matched = [_match(s) for s in scans]
    scores = np.concatenate([m.nodule_scores for m in matched])
    diameters = np.concatenate([m.nodule_diameters for m in matched])
    fp_scores = np.concatenate([m.fp_scores for m in matched])
    if len(scores) == 0:
        raise FrocError("the ground truth has no (non-excluded) nodules; sensitivity is undefined")

    n = len(scans)
    fps, sens, thresholds = _curve(scores, fp_scores, n)
    at_points = _interp(operating_points, fps, sens)

    bands = []
    for low, high in size_bands:
        in_band = (diameters >= low) & (diameters < high)
        band_sens: float | None = None
        if in_band.any():
            band_fps, band_curve, _ = _curve(scores[in_band], fp_scores, n)
            if band_fp_rate is None:
                band_sens = float(band_curve[-1]) if len(band_curve) else 0.0
            else:
                band_sens = float(_interp([band_fp_rate], band_fps, band_curve)[0])
        bands.append(BandResult(low, high, int(in_band.sum()), band_sens))

    ci: tuple[float, float] | None = None
    if bootstrap:
        rng = np.random.default_rng(seed)
        cpms = []
        for _ in range(bootstrap):
            pick = [matched[i] for i in rng.integers(0, n, size=n)]
            s = np.concatenate([m.nodule_scores for m in pick])
            if len(s) == 0:  # a resample with no nodules has no sensitivity; skip it
                continue
            f = np.concatenate([m.fp_scores for m in pick])
            cpms.append(_cpm(s, f, n, operating_points))
        if cpms:
            tail = (1.0 - confidence) / 2.0 * 100.0
            lo, hi = np.percentile(cpms, [tail, 100.0 - tail])
            ci = (float(lo), float(hi))

    return FrocReport(
        n_scans=n,
        n_nodules=len(scores),
        n_detected=int((~np.isnan(scores)).sum()),
        n_false_positives=len(fp_scores),
        n_ignored=sum(m.ignored for m in matched),
        operating_points=tuple(float(p) for p in operating_points),
        sensitivities=tuple(float(v) for v in at_points),
        cpm=float(at_points.mean()),
        curve_fps=tuple(float(v) for v in fps),
        curve_sensitivity=tuple(float(v) for v in sens),
        curve_thresholds=tuple(float(v) for v in thresholds),
        band_fp_rate=band_fp_rate,
        size_bands=tuple(bands),
        bootstrap_samples=bootstrap,
        bootstrap_seed=seed,
        confidence=confidence,
        cpm_ci=ci,
    )


def plot_froc(report: FrocReport, path: Path, *, size: tuple[int, int] = (640, 480)) -> None:
    """Write the FROC curve as a PNG: log-scale x from 1/8 to 8 FPs per scan, as LUNA16's."""
    from PIL import Image, ImageDraw  # noqa: PLC0415  (Pillow only for the figure)

    width, height = size
    left, right, top, bottom = 60, 20, 30, 50
    x_lo, x_hi = math.log2(OPERATING_POINTS[0]), math.log2(OPERATING_POINTS[-1])

    def px(rate: float, sensitivity: float) -> tuple[float, float]:
        u = (math.log2(rate) - x_lo) / (x_hi - x_lo)
        return (
            left + u * (width - left - right),
            top + (1.0 - sensitivity) * (height - top - bottom),
        )

    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    for rate in OPERATING_POINTS:
        x, _ = px(rate, 0.0)
        draw.line([px(rate, 0.0), px(rate, 1.0)], fill=(220, 220, 220))
        draw.text((x - 10, height - bottom + 6), f"{rate:g}", fill="black")
    for tick in range(11):
        s = tick / 10
        _, y = px(OPERATING_POINTS[0], s)
        draw.line([px(OPERATING_POINTS[0], s), px(OPERATING_POINTS[-1], s)], fill=(220, 220, 220))
        draw.text((left - 30, y - 6), f"{s:.1f}", fill="black")
    draw.rectangle([px(OPERATING_POINTS[0], 1.0), px(OPERATING_POINTS[-1], 0.0)], outline="black")
    draw.text((width // 2 - 70, height - 22), "Average FPs per scan", fill="black")
    draw.text((4, top - 22), "Sensitivity", fill="black")
    title = f"FROC  CPM {report.cpm:.3f}"
    if report.cpm_ci is not None:
        lo, hi = report.cpm_ci
        title += f"  ({report.confidence:.0%} CI {lo:.3f}-{hi:.3f})"
    draw.text((width // 2 - 60, 8), title, fill="black")

    rates = np.geomspace(OPERATING_POINTS[0], OPERATING_POINTS[-1], num=400)
    fps = np.array(report.curve_fps, dtype=np.float64)
    sens = np.array(report.curve_sensitivity, dtype=np.float64)
    curve = _interp(list(rates), fps, sens)
    draw.line(
        [px(float(r), float(s)) for r, s in zip(rates, curve, strict=True)], fill="blue", width=2
    )
    for rate, s in zip(report.operating_points, report.sensitivities, strict=True):
        if OPERATING_POINTS[0] <= rate <= OPERATING_POINTS[-1]:
            x, y = px(rate, s)
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill="red")
    image.save(path, format="PNG")


# ------------------------------------------------------------------------------ comparison
@dataclass(frozen=True)
class Comparison:
    """Two systems' FROC on the same scans, with a paired bootstrap of the CPM difference."""

    n_scans: int
    n_nodules: int
    cpm_a: float
    cpm_b: float
    sensitivities_a: tuple[float, ...]
    sensitivities_b: tuple[float, ...]
    operating_points: tuple[float, ...]
    bootstrap_samples: int
    bootstrap_seed: int
    confidence: float
    difference_ci: tuple[float, float]  # CPM(b) - CPM(a)
    b_better_fraction: float  # resamples with CPM(b) > CPM(a)

    @property
    def difference(self) -> float:
        return self.cpm_b - self.cpm_a

    def to_json(self) -> dict[str, Any]:
        return {
            "format": "aidx-froc-compare/1",
            "n_scans": self.n_scans,
            "n_nodules": self.n_nodules,
            "operating_points": list(self.operating_points),
            "a": {"cpm": self.cpm_a, "sensitivities": list(self.sensitivities_a)},
            "b": {"cpm": self.cpm_b, "sensitivities": list(self.sensitivities_b)},
            "difference": self.difference,
            "bootstrap": {
                "samples": self.bootstrap_samples,
                "seed": self.bootstrap_seed,
                "confidence": self.confidence,
                "difference_ci": list(self.difference_ci),
                "b_better_fraction": self.b_better_fraction,
            },
        }


def compare(
    scans_a: Sequence[Scan],
    scans_b: Sequence[Scan],
    *,
    operating_points: Sequence[float] = OPERATING_POINTS,
    bootstrap: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> Comparison:
    """Compare two systems scored on the same scans and ground truth. The bootstrap resamples
    scans once for both systems (paired), so the interval is for the difference itself: much
    narrower than the two CPM intervals side by side, which share most of their noise."""
    if bootstrap < 1 or not 0.0 < confidence < 1.0:
        raise FrocError("bootstrap must be >= 1 and confidence in (0, 1)")
    by_id_b = {s.id: s for s in scans_b}
    if sorted(by_id_b) != sorted(s.id for s in scans_a) or len(by_id_b) != len(scans_b):
        raise FrocError("the two evaluations must cover the same scans, once each")
    for a in scans_a:
        b = by_id_b[a.id]
        if (a.nodules, a.exclude) != (b.nodules, b.exclude):
            raise FrocError(f"scan {a.id}: the two evaluations have different ground truth")
    ordered_b = [by_id_b[s.id] for s in scans_a]
    report_a = evaluate(scans_a, operating_points=operating_points, bootstrap=0)
    report_b = evaluate(ordered_b, operating_points=operating_points, bootstrap=0)
    matched_a = [_match(s) for s in scans_a]
    matched_b = [_match(s) for s in ordered_b]
    n = len(scans_a)
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(bootstrap):
        pick = rng.integers(0, n, size=n)
        scores_a = np.concatenate([matched_a[i].nodule_scores for i in pick])
        if len(scores_a) == 0:
            continue
        scores_b = np.concatenate([matched_b[i].nodule_scores for i in pick])
        fp_a = np.concatenate([matched_a[i].fp_scores for i in pick])
        fp_b = np.concatenate([matched_b[i].fp_scores for i in pick])
        diffs.append(
            _cpm(scores_b, fp_b, n, operating_points) - _cpm(scores_a, fp_a, n, operating_points)
        )
    if not diffs:
        raise FrocError("no bootstrap resample held a nodule; evaluate on more scans")
    tail = (1.0 - confidence) / 2.0 * 100.0
    lo, hi = np.percentile(diffs, [tail, 100.0 - tail])
    return Comparison(
        n_scans=n,
        n_nodules=report_a.n_nodules,
        cpm_a=report_a.cpm,
        cpm_b=report_b.cpm,
        sensitivities_a=report_a.sensitivities,
        sensitivities_b=report_b.sensitivities,
        operating_points=tuple(float(p) for p in operating_points),
        bootstrap_samples=len(diffs),
        bootstrap_seed=seed,
        confidence=confidence,
        difference_ci=(float(lo), float(hi)),
        b_better_fraction=float(np.mean(np.asarray(diffs) > 0)),
    )
