"""The dashboard tab: turnaround times (receipt -> AI result -> sign-off), decisions per model
version and findings per study (figures from ui/dashboard.py), for every signed-in role."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gradio as gr
import pandas as pd

from ui import dashboard, drift

# What the bars stack: parts that add up, never a whole beside its parts (the AI findings are
# accepted as is, edited, rejected or undecided; the radiologist's own come on top).
_STACKED_STAGES = ("receipt_to_result", "result_to_signoff")
_KINDS = ("accepted", "edited", "rejected", "pending", "added")


def _label(uid: str) -> str:
    return "…" + uid[-8:]


def _code(text: str) -> str:
    """Inline code, so that Markdown shows ``lung-nodule@0.5.0`` as it is, not as a mail link."""
    return "`" + text.replace("`", "") + "`"


def dashboard_data(
    ctx: Any, t: Callable[..., str] = lambda key, **v: key
) -> tuple[str, pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """The summary (Markdown) and the three plots' frames, with the labels in ``t``'s
    language: turnaround stages per study, final decisions per model version, findings per
    study; each bar's parts are disjoint and add up to it."""
    turnaround = dashboard.turnaround(ctx.reviews)
    stages = dashboard.turnaround_stages(turnaround)
    stages = stages[stages["stage"].isin(_STACKED_STAGES)]
    stages = pd.DataFrame(
        {
            t("dash_study"): stages["study_uid"].map(_label),
            t("dash_stage"): stages["stage"].map(lambda s: t(f"stage_{s}")),
            t("dash_minutes"): stages["minutes"],
        }
    )
    rates = dashboard.decision_rates(ctx.reviews)
    rates_long = _parts(rates, t("dash_model"), rates["model"], t("dash_decision"), t)
    per_study = dashboard.findings_per_study(ctx.reviews)
    findings = _parts(
        per_study, t("dash_study"), per_study["study_uid"].map(_label), t("dash_kind"), t
    )
    s = dashboard.summary(ctx.reviews)
    lines = [
        "- "
        + t(
            "dash_counts",
            received=s["studies_received"],
            results=s["ai_results"],
            signed=s["signed"],
            awaiting=s["awaiting_signoff"],
        )
    ]
    for stage in dashboard.STAGES:
        value = s.get(f"median_{stage}_min")
        if value is not None:
            lines.append("- " + t(f"dash_median_{stage}", value=value))
    if s.get("acceptance_rate") is not None:
        lines.append(
            "- "
            + t(
                "dash_decided",
                decided=s["findings_decided"],
                accepted=s["acceptance_rate"],
                rejected=s["rejection_rate"],
            )
        )
    if not rates.empty:
        per_model = ", ".join(
            t(
                "dash_model_rate",
                model=_code(str(r["model"])),
                accepted=r["acceptance_rate"],
                rejected=r["rejection_rate"],
            )
            for _, r in rates.iterrows()
            if pd.notna(r["acceptance_rate"])
        )
        if per_model:
            lines.append("- " + t("dash_per_model", rates=per_model))
    return "\n".join(lines), stages, rates_long, findings


def _parts(
    frame: pd.DataFrame, x_name: str, x: pd.Series, part_name: str, t: Callable[..., str]
) -> pd.DataFrame:
    """One row per bar (``x``) and disjoint kind of finding, for a stacked bar plot."""
    return pd.DataFrame(
        [
            {x_name: label, part_name: t(f"kind_{kind}"), t("dash_count"): _as_is(row, kind)}
            for label, (_, row) in zip(x, frame.iterrows(), strict=True)
            for kind in _KINDS
        ],
        columns=[x_name, part_name, t("dash_count")],
    )


def _as_is(row: Any, kind: str) -> int:
    """A count of one disjoint kind: the store's ``accepted`` includes the edited ones."""
    if kind == "accepted":
        return int(row["accepted"]) - int(row["edited"])
    return int(row[kind])


def dashboard_tab(
    ctx: Any, t: Callable[..., str], current_user: Callable[..., Any]
) -> tuple[Callable[..., Any], list[Any]]:
    """The tab's components; returns its loader and outputs (run when the tab opens too)."""
    refresh = gr.Button(t("dashboard_refresh"), elem_id="dashboard-refresh")
    summary = gr.Markdown(elem_id="dashboard-summary")
    turnaround = gr.BarPlot(
        x=t("dash_study"),
        y=t("dash_minutes"),
        color=t("dash_stage"),
        title=t("turnaround"),
        elem_id="turnaround",
    )
    decisions = gr.BarPlot(
        x=t("dash_model"),
        y=t("dash_count"),
        color=t("dash_decision"),
        title=t("decisions_per_model"),
        elem_id="decisions",
    )
    findings = gr.BarPlot(
        x=t("dash_study"),
        y=t("dash_count"),
        color=t("dash_kind"),
        title=t("findings_per_study"),
        elem_id="findings-per-study",
    )

    drift_table = gr.DataFrame(label=t("drift_watch"), elem_id="drift-watch", interactive=False)

    def load(request: gr.Request) -> tuple[Any, ...]:
        current_user(ctx, request)
        return (*dashboard_data(ctx, t), drift.weekly(ctx.reviews))

    outputs = [summary, turnaround, decisions, findings, drift_table]
    refresh.click(load, None, outputs)
    return load, outputs
