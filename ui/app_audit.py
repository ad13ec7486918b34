"""The audit-log tab (administrators): recent entries and the CSV download."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import gradio as gr
import pandas as pd

from ui.accounts import PermissionDenied
from ui.audit import format_time

SHOWN = 500  # newest entries shown; the CSV holds them all


def audit_tab_contents(
    ctx: Any, t: Callable[..., str], current_user: Callable[..., Any]
) -> tuple[Callable[..., Any], list[Any]]:
    """The tab's components; returns its loader and outputs (run when the tab opens too)."""
    columns = ["time", "user", "role", "action", "study", "detail", "client"]
    gr.Markdown(f"{t('admins_only')} [{t('audit_download')}](/admin/audit.csv)")
    refresh = gr.Button(t("audit_refresh"), elem_id="audit-refresh")
    table = gr.Dataframe(headers=columns, interactive=False, elem_id="audit", wrap=True)

    def load(request: gr.Request) -> pd.DataFrame:
        user = current_user(ctx, request)
        if user.role != "admin":
            raise PermissionDenied("administrators only")
        entries = ctx.accounts.audit.query(limit=SHOWN)  # newest first
        return pd.DataFrame(
            [
                [
                    format_time(e.at),
                    e.username,
                    e.role or "",
                    e.action,
                    e.study_uid or "",
                    json.dumps(e.detail, ensure_ascii=False) if e.detail else "",
                    e.client or "",
                ]
                for e in entries
            ],
            columns=columns,
        )

    def guarded(request: gr.Request) -> pd.DataFrame:
        try:
            return load(request)
        except PermissionDenied:
            raise gr.Error(t("no_permission")) from None

    refresh.click(guarded, None, table)
    return guarded, [table]
