"""`aidx status`: recent studies, or one study's timeline, results and deliveries.

Read from the store, so it shows what every process (node, separate workers) did. Identifies
studies by UID only: patient names, IDs, birth dates and accession numbers are never shown.
:func:`recent_status` and :func:`study_status` return the same data as ``--json`` prints, for
scripts and the review app.
"""

from __future__ import annotations

import argparse
import heapq
import json
import sys
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aidx.cli.exit_codes import EXIT_OK, EXIT_USAGE

if TYPE_CHECKING:
    from aidx.config import AidxConfig
    from aidx.store.store import Store


def status(args: argparse.Namespace, config: AidxConfig) -> int:
    if args.limit < 1:
        print(f"aidx status: --limit must be at least 1, not {args.limit}", file=sys.stderr)
        return EXIT_USAGE
    db = _default_db(config)
    if db is not None and not db.exists():
        print(
            f"aidx status: no store at {db}: nothing was received with this data_dir; give the "
            "node's data directory with --data-dir (or data_dir / store.url in the configuration)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    from aidx.store.store import Store

    store = Store.for_config(config)
    try:
        if args.study_uid is None:
            studies = recent_status(store, args.limit)
            if args.json:
                _print_json({"studies": studies})
            else:
                _print_recent(studies)
            return EXIT_OK
        report = study_status(store, args.study_uid)
    finally:
        store.close()
    if report is None:
        print(
            f"aidx status: no study {args.study_uid} in the store; `aidx status` lists the "
            "recent ones",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if args.json:
        _print_json(report)
    else:
        _print_study(report)
    return EXIT_OK


def _default_db(config: AidxConfig) -> Path | None:
    """The default SQLite file, which only `aidx serve` (or `send --queue`) creates."""
    if config.store.url is not None:
        return None
    return (config.data_dir / "aidx.db").resolve()


# ----------------------------------------------------------------------------------- the data
def _reviews(store: Store, study_uid: str) -> list[dict[str, Any]]:
    """The study's reviews (one per result a radiologist can review), oldest first."""
    from sqlalchemy import select

    from aidx.store.schema import results, reviews

    query = (
        select(reviews, results.c.job_id, results.c.study_version)
        .join(results, results.c.id == reviews.c.result_id)
        .where(reviews.c.study_uid == study_uid)
        .order_by(reviews.c.id)
    )
    with store.engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(query)]


def recent_status(store: Store, limit: int = 20) -> list[dict[str, Any]]:
    """The latest studies (latest arrival first) with their latest job and review."""
    from aidx.store.jobs import FAILED, NOT_APPLICABLE

    reason_states = (FAILED, NOT_APPLICABLE)  # their reason answers "why are there no results?"
    out = []
    for row in store.recent_studies(limit):
        latest = _reviews(store, row["study_uid"])[-1:]
        out.append(
            {
                "study_uid": row["study_uid"],
                "instances": int(row["instance_count"]),
                "study_state": row["study_state"],
                "job_id": row["job_id"],
                "job_state": row["job_state"],
                "priority": row["priority"],
                "first_image": _iso(row["first_arrival"]),
                "last_image": _iso(row["last_arrival"]),
                "calling_ae": row["calling_ae"],
                "reason": row["reason"] if row["job_state"] in reason_states else None,
                "review_state": latest[0]["state"] if latest else None,
            }
        )
    return out


def study_status(store: Store, study_uid: str) -> dict[str, Any] | None:
    """One study's timeline, jobs, results and outbox items; None when it is not in the store."""
    from sqlalchemy import select

    from aidx.store.schema import outbox

    study = store.study(study_uid)
    if study is None:
        return None
    last_image = float(study["last_arrival"])

    def offset(at: float | None) -> float | None:
        return None if at is None else round(float(at) - last_image, 3)

    study_reviews = _reviews(store, study_uid)
    recorded = [
        {
            "at": _iso(e["at"]),
            "offset_s": offset(e["at"]),
            "event": e["event"],
            "job_id": e["job_id"],
            "detail": e["detail"],
        }
        for e in store.study_events(study_uid)
    ]
    # The review's steps in the timeline: opened by a radiologist, signed (the latest signing).
    review_steps = []
    for r in study_reviews:
        if r["opened_at"] is not None:
            review_steps.append(_event(r["opened_at"], offset, "review opened", r["job_id"], ""))
        if r["signed_at"] is not None:
            detail = f"by {r['signed_by']}" + (
                f" (signing {r['sign_count']})" if r["sign_count"] > 1 else ""
            )
            review_steps.append(_event(r["signed_at"], offset, "signed", r["job_id"], detail))
    review_steps.sort(key=_offset_key)
    # The store's events stay in the order they were written (their ids): a worker's clock read
    # just before it claimed a job may come a few milliseconds before the completion that made the
    # job, and sorting by time would put the job's start before its study was complete.
    events = list(heapq.merge(recorded, review_steps, key=_offset_key))
    with store.engine.connect() as conn:
        items = [
            dict(r._mapping)
            for r in conn.execute(
                select(outbox).where(outbox.c.study_uid == study_uid).order_by(outbox.c.id)
            )
        ]
    return {
        "study_uid": study_uid,
        "state": study["state"],
        "version": study["version"],
        "instances": study["instance_count"],
        "bytes": study["bytes"],
        "calling_ae": study["calling_ae"],
        "first_image": _iso(study["first_arrival"]),
        "first_image_offset_s": offset(study["first_arrival"]),
        "last_image": _iso(last_image),
        "completed_at": _iso(study["completed_at"]),
        "events": events,
        "jobs": [
            {
                "id": j["id"],
                "study_version": j["study_version"],
                "state": j["state"],
                "reason": j["reason"],
                "priority": j["priority"],
                "attempts": j["attempts"],
                "model": j["model"],
                "inference_s": j["inference_s"],
                "created_at": _iso(j["created_at"]),
                "started_at": _iso(j["started_at"]),
                "finished_at": _iso(j["finished_at"]),
            }
            for j in store.study_jobs(study_uid)
        ],
        "results": [
            {
                "job_id": r["job_id"],
                "study_version": r["study_version"],
                "model": r["model"],
                "shadow": bool(r["shadow"]),  # a challenger's: stored, never sent or reviewed
                "series_uid": r["series_uid"],
                "findings": r["finding_count"],
                "max_probability": r["max_probability"],
                "findings_path": r["findings_path"],
                "sr_path": r["sr_path"],
                "seg_path": r["seg_path"],
            }
            for r in store.study_results(study_uid)
        ],
        "reviews": [
            {
                "review_id": r["id"],
                "job_id": r["job_id"],
                "study_version": r["study_version"],
                "state": r["state"],
                "opened_at": _iso(r["opened_at"]),
                "signed_by": r["signed_by"],
                "signed_at": _iso(r["signed_at"]),
                "signings": r["sign_count"],
                "signed_sr_uid": r["signed_sr_uid"],
                "signed_sr_path": r["signed_sr_path"],
            }
            for r in study_reviews
        ],
        "destinations": [
            {
                "destination": i["destination"],
                "outbox_id": i["id"],
                "job_id": i["job_id"],
                "state": i["state"],
                "attempts": i["attempts"],
                "files": len(json.loads(i["files"])),
                "next_attempt_at": _iso(i["next_attempt_at"]) if i["state"] == "pending" else None,
                "sent_at": _iso(i["sent_at"]),
                "last_error": i["last_error"],
            }
            for i in items
        ],
    }


def _offset_key(event: dict[str, Any]) -> float:
    return float(event["offset_s"]) if event["offset_s"] is not None else 0.0


def _event(at: float, offset: Any, name: str, job_id: int | None, detail: str) -> dict[str, Any]:
    return {
        "at": _iso(at),
        "offset_s": offset(at),
        "event": name,
        "job_id": job_id,
        "detail": detail,
    }


def _iso(epoch: float | None) -> str | None:
    """Local time with its UTC offset, to the millisecond."""
    if epoch is None:
        return None
    return datetime.fromtimestamp(float(epoch)).astimezone().isoformat(timespec="milliseconds")


# ------------------------------------------------------------------------------- the printing
def _print_json(data: object) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False))


def _when(iso: str | None) -> str:
    """``2024-05-01 12:00:03.100`` (local time, as the ISO value minus its offset)."""
    return "-" if iso is None else iso[:23].replace("T", " ")


def _print_recent(studies: list[dict[str, Any]]) -> None:
    if not studies:
        print("no studies received yet")
        return
    width = max(len("STUDY UID"), *(len(s["study_uid"]) for s in studies))
    print(
        f"{'STUDY UID':<{width}}  {'IMAGES':>6}  {'STUDY':<9}  {'JOB':<14}  {'REVIEW':<9}  "
        f"{'PRIO':>4}  {'LAST RECEIVED':<23}  REASON"
    )
    for s in studies:
        priority = "-" if s["priority"] is None else str(s["priority"])
        print(
            f"{s['study_uid']:<{width}}  {s['instances']:>6}  {s['study_state']:<9}  "
            f"{s['job_state'] or '-':<14}  {s['review_state'] or '-':<9}  "
            f"{priority:>4}  {_when(s['last_image']):<23}  "
            f"{s['reason'] or ''}".rstrip()
        )


def _print_study(r: dict[str, Any]) -> None:
    print(f"Study {r['study_uid']}")
    print(
        f"  {r['state']} (version {r['version']}), {_count(r['instances'], 'instance')}, "
        f"{_size(r['bytes'])}, from {r['calling_ae']}"
    )
    print("\nTimeline (offset from the last image)")
    rows = [
        (r["first_image"], r["first_image_offset_s"], "first image", None, ""),
        (r["last_image"], 0.0, "last image", None, ""),
    ]
    rows += [
        (e["at"], e["offset_s"], e["event"], e["job_id"], e["detail"] or "") for e in r["events"]
    ]
    for at, off, name, job_id, detail in rows:
        job = f"job {job_id}" if job_id is not None else ""
        print(f"  {_when(at)}  {_offset(off):>12}  {name:<18} {job:<8} {detail}".rstrip())

    print("\nResults")
    if not r["results"]:
        print("  none")
    for res in r["results"]:
        print(
            f"  {res['model']}{' (shadow)' if res['shadow'] else ''}  series {res['series_uid']}"
            f"  {res['findings']} findings (study version {res['study_version']}, "
            f"job {res['job_id']})"
        )
        print(f"    SR   {res['sr_path']}")
        print(f"    SEG  {res['seg_path'] or '-'}")

    print("\nReview")
    if not r["reviews"]:
        print("  none")
    for v in r["reviews"]:
        print(
            f"  review {v['review_id']} of job {v['job_id']} (study version "
            f"{v['study_version']}): {v['state']}"
        )
        if v["signed_at"]:
            again = f", {v['signings']} signings" if v["signings"] > 1 else ""
            print(f"    signed by {v['signed_by']} at {_when(v['signed_at'])}{again}")
            print(f"    signed SR  {v['signed_sr_path']}")

    print("\nDestinations")
    if not r["destinations"]:
        print("  none")
    for d in r["destinations"]:
        when = f"sent {_when(d['sent_at'])}" if d["sent_at"] else ""
        if d["next_attempt_at"]:
            when = f"next {_when(d['next_attempt_at'])}"
        error = f"  last error: {d['last_error']}" if d["last_error"] else ""
        print(
            f"  {d['destination']:<16} {d['state']:<8} attempts {d['attempts']:<3} "
            f"job {d['job_id'] if d['job_id'] is not None else '-'}  {when}{error}".rstrip()
        )


def _offset(seconds: float) -> str:
    """``+12.4 s`` near the last image; minutes, hours or days further away."""
    sign = "-" if seconds < 0 else "+"
    value = abs(seconds)
    if value < 100:
        return f"{sign}{value:.1f} s"
    whole = int(value)
    if whole < 3600:
        return f"{sign}{whole // 60} min {whole % 60:02d} s"
    if whole < 86400:
        return f"{sign}{whole // 3600} h {whole % 3600 // 60:02d} min"
    return f"{sign}{whole // 86400} d {whole % 86400 // 3600:02d} h"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")
