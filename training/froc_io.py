"""Inputs and outputs of a FROC evaluation: ground truth from a canonical ``dataset.json``,
detections from ``findings.json`` files or a LUNA16-style CSV, and the pairing of the two into
:class:`training.froc.Scan` records. Torch-free."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from inference.findings import FindingsReport

from .froc import Detection, FrocError, Nodule, Scan, as_point


def load_detections(folder: Path) -> dict[str, tuple[Detection, ...]]:
    """Detections from a folder of ``findings.json`` files (one per series), keyed by UID."""
    paths = sorted(folder.glob("*.json"))
    if not paths:
        raise FrocError(f"{folder}: no findings .json files")
    out: dict[str, tuple[Detection, ...]] = {}
    for path in paths:
        report = FindingsReport.read(path)
        uid = report.series_instance_uid
        if uid in out:
            raise FrocError(f"{path}: series {uid} already has a findings file in {folder}")
        out[uid] = tuple(Detection(f.center_mm, f.probability) for f in report.findings)
    return out


def load_ground_truth(
    dataset_json: Path, uid_of_case: Mapping[str, str] | None = None
) -> dict[str, tuple[tuple[Nodule, ...], tuple[Nodule, ...]]]:
    """(nodules, excluded nodules) per series UID from a canonical ``dataset.json``.

    A case's id is its series UID unless ``uid_of_case`` maps it. Excluded nodules come from an
    optional per-case ``excluded_lesions`` list shaped like ``lesions``.
    """
    try:
        cases = json.loads(dataset_json.read_text(encoding="utf-8"))["cases"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise FrocError(f"{dataset_json}: not a dataset.json with 'cases' ({exc!r})") from exc
    out: dict[str, tuple[tuple[Nodule, ...], tuple[Nodule, ...]]] = {}
    for case in cases:
        try:
            case_id = str(case["id"])
            uid = case_id if uid_of_case is None else uid_of_case[case_id]
            lists = [case["lesions"], case.get("excluded_lesions", [])]
            nodules, excluded = (
                tuple(
                    Nodule(as_point(les["center_mm"], case_id), float(les["diameter_mm"]))
                    for les in lesions
                )
                for lesions in lists
            )
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, FrocError):
                raise
            raise FrocError(f"{dataset_json}: case {case.get('id', '?')}: {exc!r}") from exc
        if uid in out:
            raise FrocError(f"{dataset_json}: series {uid} appears in two cases")
        out[uid] = (nodules, excluded)
    return out


def build_scans(
    truth: Mapping[str, tuple[tuple[Nodule, ...], tuple[Nodule, ...]]],
    detections: Mapping[str, tuple[Detection, ...]],
    *,
    missing_ok: bool = False,
) -> list[Scan]:
    """Pair truth and detections by series UID. Detections for an unknown series are an error
    (usually a wrong case-to-UID mapping); a series without detections is an error unless
    ``missing_ok``, which scores it as having no detections."""
    unknown = sorted(set(detections) - set(truth))
    if unknown:
        raise FrocError(f"detections for series not in the ground truth: {unknown[:5]}")
    missing = sorted(set(truth) - set(detections))
    if missing and not missing_ok:
        raise FrocError(
            f"{len(missing)} series have no findings file, e.g. {missing[:5]}; "
            "run inference on them or pass missing_ok=True to score them as empty"
        )
    return [
        Scan(uid, nodules, detections.get(uid, ()), excluded)
        for uid, (nodules, excluded) in truth.items()
    ]


# ------------------------------------------------------------------------------ detections
DETECTIONS_CSV_HEADER = ("seriesuid", "coordX", "coordY", "coordZ", "probability")


def write_detections_csv(scans: Sequence[Scan], path: Path) -> None:
    """Every scan's detections in LUNA16's submission format (seriesuid: the scan id; patient
    coordinates in mm), so that an evaluation can be compared or re-scored without inference."""
    lines = [",".join(DETECTIONS_CSV_HEADER)]
    for scan in scans:
        if "," in scan.id or '"' in scan.id:
            raise FrocError(f"scan id {scan.id!r} cannot be written to CSV (comma or quote)")
        for d in scan.detections:
            x, y, z = d.center_mm
            lines.append(f"{scan.id},{x!r},{y!r},{z!r},{d.probability!r}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def read_detections_csv(path: Path) -> dict[str, tuple[Detection, ...]]:
    """Detections per scan id from a LUNA16-style CSV (columns named in the header, any order)."""
    try:
        rows = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise FrocError(f"{path}: cannot read detections ({exc})") from exc
    if not rows:
        raise FrocError(f"{path}: empty; expected the header {','.join(DETECTIONS_CSV_HEADER)}")
    header = [h.strip() for h in rows[0].split(",")]
    missing = [h for h in DETECTIONS_CSV_HEADER if h not in header]
    if missing:
        raise FrocError(f"{path}: the header lacks {', '.join(missing)}")
    col = {h: header.index(h) for h in DETECTIONS_CSV_HEADER}
    out: dict[str, list[Detection]] = {}
    for number, row in enumerate(rows[1:], start=2):
        if not row.strip():
            continue
        cells = row.split(",")
        try:
            scan_id = cells[col["seriesuid"]].strip()
            centre = as_point([cells[col[k]] for k in ("coordX", "coordY", "coordZ")], scan_id)
            probability = float(cells[col["probability"]])
        except (IndexError, ValueError) as exc:
            raise FrocError(f"{path}:{number}: {exc}") from exc
        out.setdefault(scan_id, []).append(Detection(centre, probability))
    return {k: tuple(v) for k, v in out.items()}


def evaluation_figures(report: dict[str, Any]) -> dict[str, float]:
    """The figures of a froc.json (``aidx evaluate``) that go into a model card."""
    figures = {
        "cpm": float(report["cpm"]),
        "scans": float(report["n_scans"]),
        "nodules": float(report["n_nodules"]),
    }
    for fp, sensitivity in zip(report["operating_points"], report["sensitivities"], strict=True):
        figures[f"sensitivity_at_{fp:g}_fp_per_scan"] = float(sensitivity)
    band_fp = report.get("band_fp_rate")
    for band in report.get("size_bands", []):
        high = band["high_mm"]
        name = f"{band['low_mm']:g}-{high:g}mm" if high is not None else f"{band['low_mm']:g}mm+"
        if band["sensitivity"] is not None:
            figures[f"sensitivity_{name}_at_{band_fp:g}_fp_per_scan"] = float(band["sensitivity"])
    ci = (report.get("bootstrap") or {}).get("cpm_ci")
    if ci:
        figures["cpm_ci_low"], figures["cpm_ci_high"] = float(ci[0]), float(ci[1])
    return figures


def operating_point(report: dict[str, Any], fp_rate: float) -> tuple[float, float]:
    """The lowest threshold of the FROC curve with at most ``fp_rate`` false positives per scan
    (or the curve's strictest point when even that has more), and its FP rate."""
    curve = report["curve"]
    points = list(zip(curve["fps"], curve["thresholds"], strict=True))
    if not points:
        raise ValueError("the FROC curve is empty")
    within = [(fp, t) for fp, t in points if fp <= fp_rate]
    fp, threshold = within[-1] if within else points[0]
    return float(min(max(threshold, 1e-6), 1.0 - 1e-7)), float(fp)
