"""What files a store lists: the inventory that ``aidx backup`` copies and ``aidx verify``
checks. Read on any connection: through a :class:`aidx.store.store.Store` the paths come back
absolute (under its root); on an engine without a root (a backup's copy of the store) as
recorded, relative to the storage root or absolute outside it."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.engine import Connection

from aidx.store.schema import instances, jobs, outbox, results, reviews


@dataclass(frozen=True)
class Listed:
    """One file the store lists, and what lists it (for the report: UIDs and ids only)."""

    path: str
    what: str
    size: int | None = None  # recorded for received instances


@dataclass
class Inventory:
    files: list[Listed] = field(default_factory=list)
    result_dirs: list[str] = field(default_factory=list)  # every file in them belongs too

    def paths(self) -> set[str]:
        return {f.path for f in self.files}


def inventory(conn: Connection, sent_outbox: bool = True) -> Inventory:
    """Every file the store lists: received instances, results, signed reports and outbox
    items (``sent_outbox`` False leaves out the files of items already delivered)."""
    inv = Inventory()
    for sop_uid, path, size in conn.execute(
        select(instances.c.sop_uid, instances.c.path, instances.c.size)
    ):
        inv.files.append(Listed(str(path), f"instance {sop_uid}", int(size)))
    for row in conn.execute(
        select(
            results.c.id,
            results.c.study_uid,
            results.c.findings_path,
            results.c.sr_path,
            results.c.seg_path,
        )
    ):
        what = f"result {row.id} of study {row.study_uid}"
        for path in (row.findings_path, row.sr_path, row.seg_path):
            if path:
                inv.files.append(Listed(str(path), what))
    for review_id, study_uid, path in conn.execute(
        select(reviews.c.id, reviews.c.study_uid, reviews.c.signed_sr_path).where(
            reviews.c.signed_sr_path.is_not(None)
        )
    ):
        inv.files.append(Listed(str(path), f"signed report of review {review_id} ({study_uid})"))
    query = select(outbox.c.id, outbox.c.destination, outbox.c.files)
    if not sent_outbox:
        query = query.where(outbox.c.state != "sent")
    for item_id, destination, files in conn.execute(query):
        for path in json.loads(files):
            inv.files.append(Listed(str(path), f"outbox item {item_id} to {destination}"))
    inv.result_dirs = [
        str(d)
        for (d,) in conn.execute(select(jobs.c.result_dir).where(jobs.c.result_dir.is_not(None)))
    ]
    return inv


def files_in(folder: Path) -> list[Path]:
    """The finished files under ``folder``: not those in hidden files or folders (a writer's
    partial files, the registry's staging folders)."""
    if not folder.is_dir():
        return []
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
