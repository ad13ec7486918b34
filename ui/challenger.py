"""A challenger's findings in the viewer, for engineers (issue 22): the shadow result of the
same study, study version and series as the review's (``aidx models shadow``; never on the
worklist), listed under the review's findings as ``challenger-<id>`` and drawn as circles in
their own colour. Radiologists never see them; nobody decides on them."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select

from aidx.store.schema import results
from aidx.store.store import Store
from inference.findings import Finding, FindingsReport
from ui.review import ReviewCase

ROLES = ("engineer",)  # who sees a challenger's findings beside the champion's
PREFIX = "challenger-"
COLOUR = (255, 128, 0)


def challenger_findings(store: Store, case: ReviewCase) -> list[tuple[str, Finding]]:
    """(challenger name@version, finding) of every shadow result beside the review's."""
    with store.engine.connect() as conn:
        rows = conn.execute(
            select(results.c.model, results.c.findings_path)
            .where(results.c.shadow.is_(True))
            .where(results.c.study_uid == case.study_uid)
            .where(results.c.study_version == case.study_version)
            .where(results.c.series_uid == case.series_uid)
            .order_by(results.c.id)
        ).all()
    out: list[tuple[str, Finding]] = []
    for model, path in rows:
        out.extend((str(model), f) for f in FindingsReport.read(Path(path)).findings)
    return out
