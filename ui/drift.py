"""Drift watch for the dashboard: per model version and week, how radiologists decide on its
findings and what it was given to read (issue 22).

One row per (model version, ISO week of the images' receipt, starting Monday, local time):
AI results, their findings per study, the acceptance and rejection rates over the findings
decided (``ui.dashboard``'s definitions: a finding's final status; edited counts as accepted),
and the input mix of the series read: scanner (Manufacturer and model name), slice thickness
and convolution kernel, each as ``value: count`` pairs, most frequent first. The header is read
from one image of each result's series (headers only). The alert rule on acceptance is
``aidx.pipeline.drift`` (a /metrics gauge and an audit entry).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Final

import pandas as pd
from sqlalchemy import select

from aidx.deflate import read_header
from aidx.store.schema import instances, results, reviews
from aidx.store.store import Store
from ui.dashboard import Since, Source, _open, findings_per_study

DRIFT_COLUMNS: Final = (
    "model",
    "week",
    "results",
    "findings_per_study",
    "decided",
    "acceptance_rate",
    "rejection_rate",
    "scanners",
    "slice_thickness",
    "kernels",
)
_TAGS = ["Manufacturer", "ManufacturerModelName", "SliceThickness", "ConvolutionKernel"]
MAX_HEADER_BYTES = 64 << 20  # a deflated header is inflated up to this, as the node does


def weekly(source: Source, since: Since = None) -> pd.DataFrame:
    """The drift table (DRIFT_COLUMNS), by model version in order of first use, then week."""
    store, _ = _open(source)
    per_study = findings_per_study(source, since)
    if per_study.empty:
        return pd.DataFrame(columns=list(DRIFT_COLUMNS))
    mix = _input_mix(store, [int(r) for r in per_study["review_id"]])
    per_study = per_study.assign(
        week=per_study["received_at"].dt.to_period("W-SUN").dt.start_time.dt.date,
        scanner=per_study["review_id"].map(lambda r: mix.get(r, ("?", "?", "?"))[0]),
        thickness=per_study["review_id"].map(lambda r: mix.get(r, ("?", "?", "?"))[1]),
        kernel=per_study["review_id"].map(lambda r: mix.get(r, ("?", "?", "?"))[2]),
    )
    first = per_study.groupby("model", sort=False)["received_at"].min()
    rows = []
    for (model, week), group in per_study.groupby(["model", "week"], sort=False):
        accepted, rejected = int(group["accepted"].sum()), int(group["rejected"].sum())
        decided = accepted + rejected
        rows.append(
            {
                "model": model,
                "week": week,
                "results": len(group),
                "findings_per_study": float(group["ai_findings"].mean()),
                "decided": decided,
                "acceptance_rate": accepted / decided if decided else None,
                "rejection_rate": rejected / decided if decided else None,
                "scanners": _mix(group["scanner"]),
                "slice_thickness": _mix(group["thickness"]),
                "kernels": _mix(group["kernel"]),
                "_first": first[model],
            }
        )
    table = pd.DataFrame(rows).sort_values(["_first", "week"], kind="stable")
    return table.drop(columns="_first").reset_index(drop=True)[list(DRIFT_COLUMNS)]


def _mix(values: pd.Series) -> str:
    return ", ".join(f"{v}: {n}" for v, n in Counter(values).most_common())


def _input_mix(store: Store, review_ids: list[int]) -> dict[int, tuple[str, str, str]]:
    """(scanner, slice thickness, kernel) of each review's series, from one of its images."""
    with store.engine.connect() as conn:
        rows = conn.execute(
            select(reviews.c.id, results.c.series_uid)
            .join(results, results.c.id == reviews.c.result_id)
            .where(reviews.c.id.in_(review_ids))
        ).all()
        paths = {}
        for review_id, series_uid in rows:
            path = conn.execute(
                select(instances.c.path).where(instances.c.series_uid == series_uid).limit(1)
            ).scalar()
            if path is not None:
                paths[int(review_id)] = Path(path)
    out = {}
    for review_id, path in paths.items():
        try:
            ds = read_header(path, MAX_HEADER_BYTES, specific_tags=_TAGS)
        except Exception:  # noqa: BLE001 - a file gone or damaged loses its mix, nothing else
            out[review_id] = ("?", "?", "?")
            continue
        scanner = " ".join(
            str(ds.get(k, "")).strip() for k in ("Manufacturer", "ManufacturerModelName")
        ).strip()
        thickness = ds.get("SliceThickness")
        out[review_id] = (
            scanner or "?",
            f"{float(thickness):g} mm" if thickness not in (None, "") else "?",
            str(ds.get("ConvolutionKernel", "") or "?"),
        )
    return out
