"""The dashboard tab: turnaround times (receipt -> AI result -> sign-off), decisions per model
version and findings per study (figures from ui/dashboard.py), for every signed-in role."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gradio as gr
import pandas as pd

from ui import dashboard

_RATE_KINDS = ("accepted", "edited", "rejected", "added", "pending")


def _label(uid: str) -> str:
    return "…" + uid[-8:]


def dashboard_data(ctx: Any) -> tuple[str, pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    turnaround = dashboard.turnaround(ctx.reviews)
    stages = dashboard.turnaround_stages(turnaround)
    stages = stages.assign(study=stages["study_uid"].map(_label))
    rates = dashboard.decision_rates(ctx.reviews)
    rates_long = pd.DataFrame(
        [
            {"model": row["model"], "decision": kind, "count": int(row[kind])}
            for _, row in rates.iterrows()
            for kind in _RATE_KINDS
        ],
        columns=["model", "decision", "count"],
    )
    findings = dashboard.findings_long(dashboard.findings_per_study(ctx.reviews))
    findings = findings.assign(study=findings["study_uid"].map(_label))
    s = dashboard.summary(ctx.reviews)
    lines = [
        f"- studies received: **{s['studies_received']}**, AI results: **{s['ai_results']}**, "
        f"signed: **{s['signed']}**, awaiting sign-off: **{s['awaiting_signoff']}**",
    ]
    for stage in dashboard.STAGES:
        value = s.get(f"median_{stage}_min")
        if value is not None:
            lines.append(f"- median {stage.replace('_', ' ')}: **{value:.1f} min**")
    if s.get("acceptance_rate") is not None:
        lines.append(
            f"- findings decided: **{s['findings_decided']}**, acceptance "
            f"**{s['acceptance_rate']:.0%}**, rejection **{s['rejection_rate']:.0%}**"
        )
    if not rates.empty:
        per_model = ", ".join(
            f"{r['model']}: {r['acceptance_rate']:.0%} accepted / {r['rejection_rate']:.0%} "
            "rejected"
            for _, r in rates.iterrows()
            if pd.notna(r["acceptance_rate"])
        )
        if per_model:
            lines.append(f"- per model version: {per_model}")
    return "\n".join(lines), stages, rates_long, findings


def dashboard_tab(
    ctx: Any, t: Callable[..., str], current_user: Callable[..., Any]
) -> tuple[Callable[..., Any], list[Any]]:
    """The tab's components; returns its loader and outputs (run when the tab opens too)."""
    refresh = gr.Button(t("dashboard_refresh"), elem_id="dashboard-refresh")
    summary = gr.Markdown(elem_id="dashboard-summary")
    turnaround = gr.BarPlot(
        x="study",
        y="minutes",
        color="stage",
        title=t("turnaround"),
        elem_id="turnaround",
    )
    decisions = gr.BarPlot(
        x="model",
        y="count",
        color="decision",
        title=t("decisions_per_model"),
        elem_id="decisions",
    )
    findings = gr.BarPlot(
        x="study",
        y="count",
        color="kind",
        title=t("findings_per_study"),
        elem_id="findings-per-study",
    )

    def load(request: gr.Request) -> tuple[Any, ...]:
        current_user(ctx, request)
        return dashboard_data(ctx)

    outputs = [summary, turnaround, decisions, findings]
    refresh.click(load, None, outputs)
    return load, outputs
