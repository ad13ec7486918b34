"""The drift alert: a model version whose findings radiologists accept less and less.

Read from the store on every /metrics scrape (``aidx.pipeline.metrics``): per model version,
the AI findings decided in reviews signed in the last ``models.drift.window_days`` (a finding's
latest decision: accepted or edited count as accepted, rejected as rejected; see
``ui.review``) give its acceptance ratio. With ``models.drift.min_acceptance`` set, a version
with at least ``min_decided`` decided findings and a ratio below it is alerting: the gauge
``aidx_model_drift_alert`` is 1, and an audit entry ``model_drift_alert`` (user ``aidx``)
records it once per window. The weekly picture (acceptance, findings per study, input mix) is
on the dashboard (``ui.drift``).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy import and_, func, select

from aidx.store.schema import audit_log, decisions, results, reviews

if TYPE_CHECKING:
    from aidx.config_models import DriftConfig
    from aidx.store.store import Store

ACTION = "model_drift_alert"
_ACCEPTED = ("accept", "edit")


@dataclass(frozen=True)
class ModelAcceptance:
    model: str  # name@version
    accepted: int
    rejected: int
    alerting: bool

    @property
    def decided(self) -> int:
        return self.accepted + self.rejected

    @property
    def ratio(self) -> float | None:
        return self.accepted / self.decided if self.decided else None


def acceptance(store: Store, since: float) -> dict[str, tuple[int, int]]:
    """(accepted, rejected) AI findings per model version, in reviews signed since ``since``."""
    latest = (
        select(func.max(decisions.c.id).label("id"))
        .where(decisions.c.finding_key.like("ai-%"))
        .group_by(decisions.c.review_id, decisions.c.finding_key)
        .subquery()
    )
    query = (
        select(results.c.model, decisions.c.action, func.count())
        .select_from(decisions)
        .join(latest, latest.c.id == decisions.c.id)
        .join(reviews, reviews.c.id == decisions.c.review_id)
        .join(results, results.c.id == reviews.c.result_id)
        .where(and_(reviews.c.state == "signed", reviews.c.signed_at >= since))
        .group_by(results.c.model, decisions.c.action)
    )
    out: dict[str, list[int]] = {}
    with store.engine.connect() as conn:
        for model, action, n in conn.execute(query):
            counts = out.setdefault(str(model), [0, 0])
            if action in _ACCEPTED:
                counts[0] += int(n)
            elif action == "reject":
                counts[1] += int(n)
    return {m: (a, r) for m, (a, r) in out.items()}


def check(store: Store, rule: DriftConfig, now: float | None = None) -> list[ModelAcceptance]:
    """Every model version's acceptance in the window, alerting ones audited once per window."""
    now = time.time() if now is None else now
    since = now - rule.window_days * 86400.0
    found = []
    for model, (accepted, rejected) in sorted(acceptance(store, since).items()):
        decided = accepted + rejected
        alerting = (
            rule.min_acceptance is not None
            and decided >= rule.min_decided
            and accepted / decided < rule.min_acceptance
        )
        found.append(ModelAcceptance(model, accepted, rejected, alerting))
    raised = [m for m in found if m.alerting]
    if raised:
        _audit(store, raised, rule, since, now)
    return found


def _audit(
    store: Store, alerting: list[ModelAcceptance], rule: DriftConfig, since: float, now: float
) -> None:
    with store._write() as conn:
        earlier = conn.execute(
            select(audit_log.c.detail).where(
                (audit_log.c.action == ACTION) & (audit_log.c.at >= since)
            )
        ).scalars()
        audited = {json.loads(d or "{}").get("model") for d in earlier}
        for m in alerting:
            if m.model in audited:
                continue
            detail = {
                "model": m.model,
                "acceptance": round(m.ratio or 0.0, 4),
                "accepted": m.accepted,
                "rejected": m.rejected,
                "min_acceptance": rule.min_acceptance,
                "window_days": rule.window_days,
            }
            conn.execute(
                audit_log.insert().values(
                    at=now,
                    username="aidx",
                    role=None,
                    action=ACTION,
                    study_uid=None,
                    detail=json.dumps(detail, sort_keys=True),
                    client=None,
                )
            )
