"""Evidence from practice: a challenger in shadow mode against the champion, both scored on the
radiologists' signed reads (``aidx models report``; the promotion gate, ``aidx models
promote``).

What counts (torch-free; reads the store through ``ui.review``):

- A **study** is a signed review (state ``signed``: a re-opened one waits for its new
  signature) of a champion's result, for which the challenger's shadow result of the same
  study, study version and series exists (``results.shadow``, ``aidx.store.shadow``).
- The **final read** of a study: its positives are the champion's findings the radiologist
  accepted or edited (at the model's centre, with the final diameter) and the findings the
  radiologist added; the champion's rejected findings are known negatives.
- **Matching**, as the FROC evaluation (``training.froc``, LUNA16): a model's finding detects a
  positive when its centre lies within the positive's radius, distance <= final diameter / 2.
  A positive counts once; further findings on it are not false positives. Every finding of a
  model that detects no positive is a false positive against the final read (counted apart
  when it lies within the radius of a rejected finding: a known negative).
- **Sensitivity** of a model: positives it detects / all positives, pooled over the studies;
  **false positives per study**: its false positives / studies. By size band: positives by
  their final diameter, false positives by the model's own diameter, in the bands of
  :data:`BANDS` (those of ``training.froc``, open below 6 mm and above 20 mm).
- **Differences** (challenger - champion) with a paired bootstrap over studies: each
  resample draws studies with replacement once for both models and recomputes both figures
  (resamples without a positive give no sensitivity difference); the interval is the
  percentile interval at ``confidence``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import select

from aidx.store.schema import results
from aidx.store.store import Store
from inference.findings import Finding, FindingsReport
from ui.review import Reviews

Point = tuple[float, float, float]
# [low, high) final diameters in mm: training.froc's band edges, open at both ends.
BANDS: tuple[tuple[float, float], ...] = ((0.0, 6.0), (6.0, 10.0), (10.0, 20.0), (20.0, math.inf))
ALL = "all"


class PracticeError(ValueError):
    """Evidence that cannot be gathered; the message says why."""


def band_name(low: float, high: float) -> str:
    if low == 0.0:
        return f"<{high:g} mm"
    if math.isinf(high):
        return f">={low:g} mm"
    return f"{low:g}-{high:g} mm"


@dataclass(frozen=True)
class Lesion:
    center_mm: Point
    diameter_mm: float


@dataclass(frozen=True)
class Scored:
    """One model on one study: which positives it detected, and its false positives."""

    detected: tuple[bool, ...]  # per positive of the study, in order
    false_positives: tuple[Lesion, ...]


@dataclass(frozen=True)
class StudyEvidence:
    study_uid: str
    study_version: int
    series_uid: str
    champion: str  # name@version of the reviewed result
    positives: tuple[Lesion, ...]
    negatives: tuple[Lesion, ...]
    champion_scored: Scored
    challenger_scored: Scored


def score(findings: Sequence[Finding], positives: Sequence[Lesion]) -> Scored:
    """Match one model's findings with a study's final read (see the module's rules)."""
    detected = [False] * len(positives)
    false_positives: list[Lesion] = []
    for f in findings:
        hit = [i for i, p in enumerate(positives) if _within(f.center_mm, p)]
        for i in hit:
            detected[i] = True
        if not hit:
            false_positives.append(Lesion(f.center_mm, f.diameter_mm))
    return Scored(tuple(detected), tuple(false_positives))


def _within(center: Point, lesion: Lesion) -> bool:
    distance2 = sum((a - b) ** 2 for a, b in zip(center, lesion.center_mm, strict=True))
    return distance2 <= (lesion.diameter_mm / 2.0) ** 2


def gather(store: Store, challenger: str) -> list[StudyEvidence]:
    """Every signed study with a shadow result of ``challenger`` (name@version), oldest signed
    first."""
    reviews = Reviews(store)
    with store.engine.connect() as conn:
        rows = conn.execute(
            select(results).where(results.c.shadow.is_(True) & (results.c.model == challenger))
        ).all()
    shadow = {(r.study_uid, r.study_version, r.series_uid): r.findings_path for r in rows}
    out = []
    for case in reviews.signed():
        if case.state != "signed":
            continue  # re-opened: its amended read is not final yet
        key = (case.study_uid, case.study_version, case.series_uid)
        if key not in shadow:
            continue
        reviewed = reviews.findings(case.review_id)
        positives = tuple(Lesion(f.center_mm, f.diameter_mm) for f in reviewed if f.included)
        negatives = tuple(
            Lesion(f.center_mm, f.diameter_mm) for f in reviewed if f.status == "rejected"
        )
        champion = FindingsReport.read(case.findings_path).findings
        challenger_findings = FindingsReport.read(Path(shadow[key])).findings
        out.append(
            StudyEvidence(
                study_uid=case.study_uid,
                study_version=case.study_version,
                series_uid=case.series_uid,
                champion=case.model,
                positives=positives,
                negatives=negatives,
                champion_scored=score(champion, positives),
                challenger_scored=score(challenger_findings, positives),
            )
        )
    return out


@dataclass(frozen=True)
class Figures:
    """One model's figures in one band (or all)."""

    positives: int
    detected: int
    false_positives: int
    at_negatives: int
    studies: int

    @property
    def sensitivity(self) -> float | None:
        return self.detected / self.positives if self.positives else None

    @property
    def fp_per_study(self) -> float | None:
        return self.false_positives / self.studies if self.studies else None


@dataclass(frozen=True)
class Difference:
    value: float | None
    ci: tuple[float, float] | None


@dataclass(frozen=True)
class BandReport:
    band: str
    champion: Figures
    challenger: Figures
    sensitivity_difference: Difference
    fp_difference: Difference


@dataclass(frozen=True)
class PracticeReport:
    challenger: str
    champions: tuple[str, ...]  # versions that read the studies (one, unless promoted meanwhile)
    studies: int
    bootstrap_samples: int
    confidence: float
    bands: tuple[BandReport, ...] = field(default=())

    def band(self, name: str = ALL) -> BandReport:
        return next(b for b in self.bands if b.band == name)

    def to_json(self) -> dict[str, Any]:
        def figures(f: Figures) -> dict[str, Any]:
            return {
                "positives": f.positives,
                "detected": f.detected,
                "sensitivity": f.sensitivity,
                "false_positives": f.false_positives,
                "false_positives_at_rejected": f.at_negatives,
                "fp_per_study": f.fp_per_study,
            }

        def diff(d: Difference) -> dict[str, Any]:
            return {"value": d.value, "ci": list(d.ci) if d.ci else None}

        return {
            "format": "aidx-practice/1",
            "challenger": self.challenger,
            "champions": list(self.champions),
            "studies": self.studies,
            "bootstrap": {"samples": self.bootstrap_samples, "confidence": self.confidence},
            "bands": [
                {
                    "band": b.band,
                    "champion": figures(b.champion),
                    "challenger": figures(b.challenger),
                    "sensitivity_difference": diff(b.sensitivity_difference),
                    "fp_per_study_difference": diff(b.fp_difference),
                }
                for b in self.bands
            ],
        }


def report(
    evidence: Sequence[StudyEvidence],
    challenger: str,
    bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> PracticeReport:
    """The figures of both models, overall and by band, with paired bootstrap intervals."""
    if bootstrap < 1 or not 0.0 < confidence < 1.0:
        raise PracticeError("bootstrap must be >= 1 and confidence in (0, 1)")
    n = len(evidence)
    bands = []
    for name, low, high in [(ALL, 0.0, math.inf)] + [
        (band_name(lo, hi), lo, hi) for lo, hi in BANDS
    ]:
        # per study: positives; detected by the champion, the challenger; their false
        # positives; of those, the ones at a rejected finding (champion, challenger)
        counts = np.array([_counts(e, low, high) for e in evidence], dtype=np.float64).reshape(n, 7)
        total = counts.sum(axis=0)
        champion = Figures(int(total[0]), int(total[1]), int(total[3]), int(total[5]), n)
        challenger_f = Figures(int(total[0]), int(total[2]), int(total[4]), int(total[6]), n)
        sens_diff, fp_diff = _bootstrap(counts, bootstrap, confidence, seed)
        bands.append(
            BandReport(
                band=name,
                champion=champion,
                challenger=challenger_f,
                sensitivity_difference=Difference(
                    _difference(challenger_f.sensitivity, champion.sensitivity), sens_diff
                ),
                fp_difference=Difference(
                    _difference(challenger_f.fp_per_study, champion.fp_per_study), fp_diff
                ),
            )
        )
    return PracticeReport(
        challenger=challenger,
        champions=tuple(sorted({e.champion for e in evidence})),
        studies=n,
        bootstrap_samples=bootstrap,
        confidence=confidence,
        bands=tuple(bands),
    )


def _counts(e: StudyEvidence, low: float, high: float) -> list[float]:
    in_band = [low <= p.diameter_mm < high for p in e.positives]

    def detected(s: Scored) -> int:
        return sum(d and b for d, b in zip(s.detected, in_band, strict=True))

    def fps(s: Scored) -> tuple[int, int]:
        kept = [f for f in s.false_positives if low <= f.diameter_mm < high]
        known = sum(1 for f in kept if any(_within(f.center_mm, n) for n in e.negatives))
        return len(kept), known

    cm_fp, cm_known = fps(e.champion_scored)
    ch_fp, ch_known = fps(e.challenger_scored)
    return [
        sum(in_band),
        detected(e.champion_scored),
        detected(e.challenger_scored),
        cm_fp,
        ch_fp,
        cm_known,
        ch_known,
    ]


def _difference(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _bootstrap(
    counts: np.ndarray[Any, np.dtype[np.float64]], samples: int, confidence: float, seed: int
) -> tuple[tuple[float, float] | None, tuple[float, float] | None]:
    n = len(counts)
    if n == 0:
        return None, None
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, n, size=(samples, n))
    drawn = counts[picks].sum(axis=1)  # (samples, 7)
    with np.errstate(divide="ignore", invalid="ignore"):
        sens = (drawn[:, 2] - drawn[:, 1]) / drawn[:, 0]
    sens = sens[drawn[:, 0] > 0]
    fp = (drawn[:, 4] - drawn[:, 3]) / n
    tail = (1.0 - confidence) / 2.0 * 100.0

    def interval(values: np.ndarray[Any, np.dtype[np.float64]]) -> tuple[float, float] | None:
        if len(values) == 0:
            return None
        lo, hi = np.percentile(values, [tail, 100.0 - tail])
        return float(lo), float(hi)

    return interval(sens), interval(fp)
