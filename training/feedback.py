"""Radiologists' signed review decisions to the canonical training dataset (training/dataset.py);
torch-free. ``aidx feedback export OUT_DIR [--since DATE]`` (aidx/cli/feedback.py) runs it.

Which reviews: those signed at least once (``ui.review.Reviews.signed``), optionally signed at or
after a time. A signed review re-opened for an amendment still counts while no decision has been
made since its last signature (its decisions are then still the signed ones); once one has, it
is skipped until it is signed again, and a case exported earlier stays as it was. Reviews of the
same series (a later study version, another model) give one case: the one signed last.

Per review, one case:

- image: the CT series the AI read (the store's instances of that series, read with
  ``inference.volume.load_series`` as the serving path reads it);
- lesions: the included findings (accepted, edited, added) in the review's order, centre as the
  review holds it (the AI's centre, or where the radiologist placed an added one) and the final
  diameter;
- label (always written, so every case trains; value i marks ``lesions[i-1]``):
  an accepted AI finding gets its segment of the AI SEG (the segment whose Tracking ID, else
  label, ends with the finding id: "Nodule 3", as inference/seg.py writes it); an edited or added
  finding gets a sphere of its final diameter at its centre (voxel centres within the radius; at
  least the voxel holding the centre), since the radiologist gave a size, not an outline. An
  accepted finding whose segment cannot be found also gets a sphere (its ``mask`` says so).
  Where masks overlap, the later lesion holds the voxel;
- provenance in the case's ``source`` (the only free-form field of the format)::

      {"kind": "aidx-review",
       "model": {"name": ..., "version": ...},   # the model whose result was reviewed
       "signed_date": "YYYY-MM-DD",              # UTC date of the last signature, no time
       "amendments": n,                          # signatures after the first
       "findings": [{"key": "ai-3" | "added-1", "source": "ai" | "added",
                     "decision": "accepted" | "edited" | "added" | "rejected" | "removed"
                                 | "pending",
                     "reviewer_role": "radiologist" | null,
                     "probability": p | null,     # the AI's, null for added findings
                     "center_mm": [x, y, z],
                     "ai_diameter_mm": d | null,  # the model's
                     "final_diameter_mm": d | null,  # null when not a lesion
                     "lesion": i | null,           # label value / lesions[i-1]
                     "mask": "ai-seg" | "sphere" | null}, ...],
       "hard_negatives": [{"key", "center_mm", "diameter_mm", "probability"}, ...]}

  Rejected AI findings are not lesions (they are background in the label) but are listed as hard
  negatives, for hard-negative mining. Findings left pending at sign-off are listed with decision
  "pending" and are neither lesions nor hard negatives.

No patient data and no identifiers in any file: the case id is ``rv-`` and 16 hex digits of an
HMAC-SHA256 of the Series Instance UID under a secret key kept in the node's data folder
(``feedback.key``, created once, mode 0600). The ids are stable across exports, so exporting
again replaces a case instead of adding a copy, but someone holding only the dataset cannot
recompute them from a UID (a plain hash of a UID can be). Keep the key with the data folder's
backups: with another key, the same study gets another id. No UIDs, dates of birth, names or
accession numbers are written; reviewers appear by role only (a username names a member of staff
and is not needed for training); a rejection's free-text reason is left out, since a radiologist
may type anything there. NIfTI headers carry no description (nibabel leaves ``descrip``,
``aux_file`` and ``db_name`` empty and writes no extensions); the gzip header names the file only.
Logs and messages name studies by UID, never by patient.

Exporting into a folder that holds an earlier feedback export adds to it: cases of the studies
exported now are replaced (each file written beside it and renamed over it), the others are kept,
and ``dataset.json`` is written last.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import highdicom as hd
import numpy as np
from numpy.typing import NDArray

from aidx.keys import SecretKeyError, key_file
from inference.findings import Finding
from inference.volume import Volume, load_series

from .converters_dicom import _check_grid, _mask
from .dataset import Case, Dataset, DatasetError, Lesion, write_case

if TYPE_CHECKING:  # the caller (aidx feedback export) passes the store and its reviews in
    from aidx.store.store import Store
    from ui.review import ReviewCase, ReviewedFinding, Reviews

log = logging.getLogger("aidx.feedback")

KIND = "aidx-review"
DATASET_NAME = "aidx-feedback"
DESCRIPTION = (
    "Radiologists' signed review decisions on AI results (aidx feedback export): lesions are the "
    "accepted, edited and added findings; rejected AI findings are hard negatives in each case's "
    "source"
)
KEY_FILE = "feedback.key"
CASE_PREFIX = "rv-"
CASE_HEX = 16
AUDIT_ACTION = "feedback_export"
_TRACKING_NUMBER = re.compile(r"(\d+)\s*$")


class FeedbackError(DatasetError):
    """The export cannot be done as asked; the message says why and what to do."""


@dataclass
class ExportSummary:
    """What one export did. ``skipped`` and ``failed`` are messages naming reviews and UIDs."""

    out: Path
    studies: int = 0  # cases written by this export
    lesions: int = 0
    hard_negatives: int = 0
    cases_total: int = 0  # cases in dataset.json afterwards
    case_ids: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------ case ids
def feedback_key(data_dir: Path) -> bytes:
    """The export's secret key, ``data_dir/feedback.key`` (created once, mode 0600; refused
    when others can reach it: :func:`aidx.keys.key_file`)."""
    try:
        return key_file(Path(data_dir) / KEY_FILE)
    except SecretKeyError as exc:
        raise FeedbackError(
            f"{exc} (for the feedback export: a new key gives every study a new case id)"
        ) from None


def case_id(key: bytes, series_uid: str) -> str:
    """The pseudonymous case id of a series: not reversible without the key."""
    digest = hmac.new(key, series_uid.encode("utf-8"), hashlib.sha256).hexdigest()
    return CASE_PREFIX + digest[:CASE_HEX]


# ------------------------------------------------------------------------------ the export
def export_feedback(
    reviews: Reviews,
    store: Store,
    out: Path,
    key: bytes,
    *,
    since: float | None = None,
    actor: str | None = None,
) -> ExportSummary:
    """Export the signed reviews (signed at or after ``since``, epoch seconds) into the dataset
    at ``out`` (see the module docstring). A review that cannot be exported (its series is gone
    from the store, its SEG does not fit) is reported in ``failed`` and the others go on.
    ``actor`` (who runs it, e.g. ``cli:alice``) gets one audit entry per study exported.
    Raises FeedbackError when ``out`` holds a dataset that is not a feedback export."""
    out = Path(out)
    summary = ExportSummary(out)
    existing = _existing(out)
    chosen = _choose(reviews, key, since, summary)
    if not chosen:
        summary.cases_total = len(existing.cases) if existing else 0
        return summary
    out.mkdir(parents=True, exist_ok=True)
    cases = {c.id: c for c in existing.cases} if existing else {}
    staging = Path(tempfile.mkdtemp(prefix=".feedback-", dir=out))
    exported: list[tuple[ReviewCase, Case]] = []
    try:
        for cid, review in chosen.items():
            where = f"review {review.review_id} (series {review.series_uid})"
            try:
                case, negatives = _export_case(reviews, store, review, cid, staging, where)
            except (ValueError, OSError) as exc:  # DatasetError, VolumeError, highdicom's
                log.error("%s: not exported: %s", where, exc)
                summary.failed.append(f"{where}: {exc}")
                continue
            _move_in(case, staging, out)
            cases[cid] = case
            exported.append((review, case))
            summary.studies += 1
            summary.lesions += len(case.lesions)
            summary.hard_negatives += negatives
            summary.case_ids.append(cid)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if exported:
        dataset = Dataset(DATASET_NAME, DESCRIPTION, sorted(cases.values(), key=lambda c: c.id))
        dataset.write(out)
    summary.cases_total = len(cases)
    if actor is not None:
        for review, case in exported:
            reviews.audit.record(
                actor,
                None,
                AUDIT_ACTION,
                review.study_uid,
                {"review": review.review_id, "case": case.id, "lesions": len(case.lesions)},
            )
    return summary


def _existing(out: Path) -> Dataset | None:
    if not (out / "dataset.json").exists():
        return None
    dataset = Dataset.load(out)
    foreign = [c.id for c in dataset.cases if c.source.get("kind") != KIND]
    if dataset.name != DATASET_NAME or foreign:
        raise FeedbackError(
            f"{out} holds the dataset {dataset.name!r}, which is not a feedback export "
            f"({len(foreign)} cases of other sources); export into an empty or new folder"
        )
    return dataset


def _choose(
    reviews: Reviews, key: bytes, since: float | None, summary: ExportSummary
) -> dict[str, ReviewCase]:
    """One review per series: the one signed last (``signed`` lists them oldest first)."""
    chosen: dict[str, ReviewCase] = {}
    for review in reviews.signed(since=since):
        cid = case_id(key, review.series_uid)
        earlier = chosen.get(cid)
        if earlier is not None:
            summary.skipped.append(
                f"review {earlier.review_id} (series {earlier.series_uid}): review "
                f"{review.review_id} of the same series was signed later and is exported instead"
            )
        chosen[cid] = review
    for cid, review in list(chosen.items()):
        if _amending(reviews, review):
            summary.skipped.append(
                f"review {review.review_id} (series {review.series_uid}): re-opened and being "
                "amended; exported again once it is signed"
            )
            del chosen[cid]
    return chosen


def _amending(reviews: Reviews, review: ReviewCase) -> bool:
    """Re-opened after signing and changed since: its current decisions are not signed ones."""
    if review.state == "signed" or review.signed_at is None:
        return False
    signed_at = review.signed_at
    return any(d["at"] > signed_at for d in reviews.decision_history(review.review_id))


def _move_in(case: Case, staging: Path, out: Path) -> None:
    """Rename the case's files from the staging folder over those in ``out`` (a reader never
    sees a half-written file)."""
    for rel in (case.image, case.label):
        if rel is None:
            continue
        target = out / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        (staging / rel).replace(target)
    case.root = out


# ------------------------------------------------------------------------------ one review
def _export_case(
    reviews: Reviews, store: Store, review: ReviewCase, cid: str, staging: Path, where: str
) -> tuple[Case, int]:
    """Write the case of one review into ``staging``; returns it and its hard-negative count."""
    volume = _series_volume(store, review, where)
    findings = reviews.findings(review.review_id)
    label = np.zeros(volume.hu.shape, dtype=np.uint16)
    lesions: list[Lesion] = []
    entries: list[dict[str, Any]] = []
    negatives: list[dict[str, Any]] = []
    segments = _SegMasks(review, volume, where)
    for finding in findings:
        entry = _entry(finding)
        if finding.included:
            number = len(lesions) + 1
            mask = None
            if finding.status == "accepted" and finding.ai is not None:
                mask = segments.mask(finding.ai)
            entry["mask"] = "ai-seg" if mask is not None else "sphere"
            if mask is None:
                mask = _sphere(volume, finding.center_mm, finding.diameter_mm, finding.key, where)
            label[mask] = number
            lesions.append(Lesion(_point(finding.center_mm), float(finding.diameter_mm)))
            entry["lesion"] = number
        elif finding.status == "rejected" and finding.ai is not None:
            negatives.append(
                {
                    "key": finding.key,
                    "center_mm": _rounded(finding.ai.center_mm),
                    "diameter_mm": round(finding.ai.diameter_mm, 3),
                    "probability": round(finding.ai.probability, 6),
                }
            )
        entries.append(entry)
    for number in range(1, len(lesions) + 1):
        if not np.any(label == number):
            log.warning(
                "%s: lesion %d lies wholly under later lesions' masks; its label is empty",
                where,
                number,
            )
    signed_at = review.signed_at if review.signed_at is not None else 0.0
    source: dict[str, Any] = {
        "kind": KIND,
        "model": {"name": review.model_name, "version": review.model_version},
        "signed_date": datetime.fromtimestamp(signed_at, tz=UTC).date().isoformat(),
        "amendments": max(0, review.sign_count - 1),
        "findings": entries,
        "hard_negatives": negatives,
    }
    case = write_case(
        staging, cid, volume.hu, volume.affine, label=label, lesions=lesions, source=source
    )
    log.info(
        "%s -> case %s: %d lesions, %d hard negatives", where, cid, len(lesions), len(negatives)
    )
    return case, len(negatives)


def _series_volume(store: Store, review: ReviewCase, where: str) -> Volume:
    rows = [
        r for r in store.study_instances(review.study_uid) if r["series_uid"] == review.series_uid
    ]
    if not rows:
        raise FeedbackError(f"{where}: the store holds no instance of the series")
    files = [Path(r["path"]) for r in rows]
    missing = sum(not f.is_file() for f in files)
    if missing:
        # Paths are not shown: a PACS export's folders may be named after the patient.
        raise FeedbackError(
            f"{where}: {missing} of the series' {len(files)} files are missing from the "
            "storage folder; the series must be received again"
        )
    return load_series(files)


def _entry(finding: ReviewedFinding) -> dict[str, Any]:
    # Neither the reviewer's username nor the free-text reason: see the module docstring.
    return {
        "key": finding.key,
        "source": finding.source,
        "decision": finding.status,
        "reviewer_role": finding.decided_role,
        "probability": round(finding.ai.probability, 6) if finding.ai is not None else None,
        "center_mm": _rounded(finding.center_mm),
        "ai_diameter_mm": round(finding.ai.diameter_mm, 3) if finding.ai is not None else None,
        "final_diameter_mm": round(finding.diameter_mm, 3) if finding.included else None,
        "lesion": None,
        "mask": None,
    }


class _SegMasks:
    """The AI SEG's segments on the series grid, by finding id; the SEG is read on first use."""

    def __init__(self, review: ReviewCase, volume: Volume, where: str) -> None:
        self._review = review
        self._volume = volume
        self._where = where
        self._seg: hd.seg.Segmentation | None = None
        self._numbers: dict[int, int] = {}
        self._read = False

    def mask(self, finding: Finding) -> NDArray[np.bool_] | None:
        """The finding's segment, or None (logged) when the SEG has no such segment."""
        if not self._read:
            self._load()
        number = self._numbers.get(finding.id)
        if self._seg is None or number is None:
            log.warning(
                "%s: the AI SEG has no segment for finding %d; its label is a sphere",
                self._where,
                finding.id,
            )
            return None
        mask = _mask(self._seg, self._volume, [number])
        if not mask.any():
            log.warning(
                "%s: segment %d of the AI SEG is empty; finding %d's label is a sphere",
                self._where,
                number,
                finding.id,
            )
            return None
        return mask

    def _load(self) -> None:
        self._read = True
        path = self._review.seg_path
        if path is None:
            return
        where = f"{self._where}: AI SEG {path.name}"
        try:
            seg = hd.seg.segread(path)
        except Exception as exc:  # highdicom raises many kinds; all mean "not a usable SEG"
            raise FeedbackError(f"{where}: not a readable DICOM SEG: {exc}") from exc
        _check_grid(seg, self._volume, where)
        self._seg = seg
        self._numbers = _segment_numbers(seg)


def _segment_numbers(seg: hd.seg.Segmentation) -> dict[int, int]:
    """Finding id -> segment number: the number the Tracking ID (else the label) ends with, as
    inference/seg.py writes them ("Nodule 3") and ui/overlays.py reads them."""
    numbers: dict[int, int] = {}
    for number in seg.segment_numbers:
        description = seg.get_segment_description(number)
        for text in (description.tracking_id, description.segment_label):
            match = _TRACKING_NUMBER.search(str(text or ""))
            if match:
                numbers.setdefault(int(match.group(1)), int(number))
                break
    return numbers


def _sphere(
    volume: Volume, center: tuple[float, float, float], diameter: float, key: str, where: str
) -> NDArray[np.bool_]:
    """Voxels whose centres lie within diameter/2 of ``center`` (LPS mm), and at least the voxel
    holding the centre; computed in the sphere's bounding box only."""
    shape = np.asarray(volume.hu.shape)
    index = volume.to_index(center)
    nearest = np.rint(index).astype(int)
    if np.any(nearest < 0) or np.any(nearest >= shape):
        raise FeedbackError(
            f"{where}: finding {key} lies at {_rounded(center)} mm, outside the series"
        )
    radius = diameter / 2.0
    reach = np.ceil(radius / np.asarray(volume.spacing)).astype(int) + 1
    lo = np.maximum(nearest - reach, 0)
    hi = np.minimum(nearest + reach + 1, shape)
    grid = np.stack(
        np.meshgrid(*(np.arange(a, b) for a, b in zip(lo, hi, strict=True)), indexing="ij"),
        axis=-1,
    ).astype(np.float64)
    distance = np.linalg.norm(volume.to_patient(grid) - np.asarray(center), axis=-1)
    mask = np.zeros(volume.hu.shape, dtype=bool)
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    mask[box] = distance <= radius
    mask[tuple(nearest)] = True
    return mask


def _point(values: tuple[float, ...]) -> tuple[float, float, float]:
    x, y, z = (float(v) for v in values)
    return (x, y, z)


def _rounded(values: tuple[float, ...]) -> list[float]:
    return [round(float(v), 3) for v in values]
