"""The review app's pages (Gradio Blocks), built once per interface language by ui/web.py.

Tabs: worklist (sortable, filterable), viewer with findings panel (decisions saved as they are
made), dashboard, and the audit log (administrators). Handlers get the signed-in user from the
request (the session gate put it there; Gradio's auth_dependency names it) and check the role
on the server for every action: hiding a tab is a convenience, not the protection.
"""

from __future__ import annotations

import functools
import html
import logging
from collections.abc import Callable
from datetime import datetime
from typing import Any

import gradio as gr
import pandas as pd

from ui.accounts import PermissionDenied, User
from ui.app_audit import audit_tab_contents
from ui.app_dashboard import dashboard_tab
from ui.i18n import LANGUAGE_NAMES, text
from ui.review import ReviewError
from ui.viewer_pane import VIEWER_CSS, viewer_command, viewer_markup, viewer_script
from ui.viewer_session import (
    ViewerState,
    add_finding,
    click_point,
    decide,
    findings_table,
    highlighted,
    open_review,
    patient_banner,
    person_name,
    prewarm,
    reopen,
    set_slider,
    sign_review,
    slider_value,
    thumbnails,
    viewer_meta,
)

log = logging.getLogger("aidx.ui.app")

CSS = """
#viewer-hidden { display: none !important; }
.aidx-warning { color: #f59e0b; font-size: 0.85rem; }
.aidx-header { font-size: 0.9rem; }
.aidx-header form { display: inline; }
.aidx-header button { text-decoration: underline; background: none !important;
  border: 0 !important; padding: 0 !important; font: inherit !important; color: inherit;
  box-shadow: none !important; min-width: 0 !important; }
#header { padding: 0 !important; }
#viewer-status p { margin: 0; font-size: 0.9rem; }
#worklist th, #worklist th *, #worklist [role=columnheader], #worklist [role=columnheader] * {
  word-break: keep-all !important; overflow-wrap: normal !important; white-space: nowrap; }
"""


def current_user(ctx: Any, request: gr.Request) -> User:
    """The request's user, read again from the store (a disabled account stops at once).

    Gradio hands a handler the state kept under the page's ``session_hash``, which the browser
    chose: the user must own that page session (the first to use it, ui.web_guard), so that
    nobody acts on, or reads, another user's viewer.
    """
    name = getattr(request, "username", None)
    user: User | None = ctx.accounts.get_user(name) if name else None
    if user is None or user.disabled:
        raise PermissionDenied("not signed in")
    session_hash = getattr(request, "session_hash", None)
    if session_hash and not ctx.session_owners.claim(session_hash, user.username):
        raise PermissionDenied("this page session belongs to another sign-in: reload the page")
    return user


def build_app(ctx: Any, lang: str) -> tuple[gr.Blocks, str]:
    """The Blocks for one language, and the HTML head it needs."""

    def t(key: str, **values: object) -> str:
        return text(lang, key, **values)

    status_choices = [
        (t("status_all"), ""),
        (t("status_new"), "new"),
        (t("status_in_review"), "in_review"),
        (t("status_signed"), "signed"),
    ]
    sort_choices = [
        (t("sort_priority"), "priority"),
        (t("sort_received"), "received"),
        (t("sort_probability"), "probability"),
        (t("sort_findings"), "findings"),
    ]
    worklist_columns = [
        t("col_review"),
        t("col_priority"),
        t("col_status"),
        t("col_patient"),
        t("col_patient_id"),
        t("col_accession"),
        t("col_description"),
        t("col_findings"),
        t("col_max_probability"),
        t("col_received"),
        t("col_model"),
    ]

    def worklist(status: str, search: str, sort: str, request: gr.Request) -> pd.DataFrame:
        current_user(ctx, request)
        rows = ctx.reviews.worklist(status=status or None, search=search or None)
        key = {
            "received": lambda w: -w.received_at,
            "probability": lambda w: -(w.max_probability or 0.0),
            "findings": lambda w: -w.finding_count,
        }.get(sort)
        if key is not None:
            rows = sorted(rows, key=key)
        # the studies a reader is likely to open next: opened ahead, so the click is quick
        prewarm(ctx, [w.review_id for w in rows if w.status != "signed"])
        data = [
            [
                w.review_id,
                w.priority,
                t(f"status_{w.status}"),
                person_name(w.patient_name),
                w.patient_id,
                w.accession_number,
                w.description,
                w.finding_count,
                round(w.max_probability, 3) if w.max_probability is not None else None,
                datetime.fromtimestamp(w.received_at).strftime("%Y-%m-%d %H:%M"),
                w.model,
            ]
            for w in rows
        ]
        return pd.DataFrame(data, columns=worklist_columns)

    def on_load(request: gr.Request) -> tuple[Any, ...]:
        user = current_user(ctx, request)
        other = "zh" if lang == "en" else "en"
        who = t("signed_in_as", name=person_name(user.display_name), role=t(f"role_{user.role}"))
        header = (
            f"<div class='aidx-header'><b>{html.escape(t('title'))}</b> · {html.escape(who)} · "
            # a form, not a Markdown link: Gradio opens links in a new tab, and the old tab
            # kept the worklist with the patients' names on screen
            f"<form method='get' action='/logout'>"
            f"<button id='log-out' type='submit'>{html.escape(t('log_out'))}</button></form> · "
            f"<form method='post' action='/language'>"
            f"<input type='hidden' name='lang' value='{other}'>"
            f"<button id='switch-language' type='submit'>{LANGUAGE_NAMES[other]}</button>"
            f"</form> · <span class='aidx-warning'>{html.escape(t('not_clinical'))}</span></div>"
        )
        return (
            header,
            gr.update(visible=user.role == "admin"),
            worklist("", "", "priority", request),
        )

    def guarded(outputs: list[Any]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Run a handler whose results go to ``outputs``; a refusal (no permission, a review
        rule, a bad value) is a message beside the controls (``message`` when it is among the
        outputs, else a notice) and leaves every other output as it was. Raising gr.Error
        instead turned the image, the table and the slider into "Error" badges that stayed,
        and logged an expected refusal as a traceback."""

        def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
            @functools.wraps(fn)  # Gradio reads the signature to pass the event and request
            def run(*args: Any, **kwargs: Any) -> Any:
                try:
                    return fn(*args, **kwargs)
                except PermissionDenied:
                    text = t("no_permission")
                except (ReviewError, ValueError) as exc:
                    text = str(exc)
                if not any(o is message for o in outputs):
                    gr.Warning(text)
                return tuple(f"⚠ {text}" if o is message else gr.skip() for o in outputs)

            return run

        return wrap

    # Gradio's copies of the slices (patient images) leave its cache after half an hour.
    with gr.Blocks(
        title=t("title"), analytics_enabled=False, delete_cache=(600, 1800), fill_width=True
    ) as blocks:
        state = gr.State(ViewerState())
        with gr.Row():
            header = gr.HTML(elem_id="header", padding=False)
        with gr.Tabs(elem_id="tabs") as tabs:
            with gr.Tab(t("tab_worklist"), id="worklist", elem_id="tab-worklist") as worklist_page:
                with gr.Row():
                    status = gr.Dropdown(status_choices, value="", label=t("status"))
                    search = gr.Textbox(label=t("search"))
                    sort = gr.Dropdown(sort_choices, value="priority", label=t("sort"))
                    refresh = gr.Button(t("refresh"), elem_id="worklist-refresh")
                gr.Markdown(t("open_hint"))
                table = gr.Dataframe(
                    headers=worklist_columns,
                    interactive=False,
                    elem_id="worklist",
                    wrap=True,
                )
            with gr.Tab(t("tab_viewer"), id="viewer", elem_id="tab-viewer"):
                viewer_status = gr.Markdown(t("no_study"), elem_id="viewer-status")
                with gr.Row(equal_height=False):
                    with gr.Column(scale=3, min_width=520):
                        gr.HTML(viewer_markup(t), elem_id="viewer-pane", padding=False)
                        with gr.Row(elem_id="viewer-hidden"):  # the viewer script's channel
                            meta = gr.HTML("<span></span>", elem_id="viewer-meta")
                            command = gr.Textbox(elem_id="viewer-command")
                            command_send = gr.Button("send", elem_id="viewer-command-send")
                    with gr.Column(scale=2, min_width=340, elem_id="review-panel"):
                        findings = gr.Dataframe(
                            label=t("findings"),
                            interactive=False,
                            elem_id="findings",
                            max_height=230,
                        )
                        selected = gr.Markdown(t("select_first"), elem_id="selected")
                        with gr.Row():
                            accept = gr.Button(t("accept"), variant="primary", elem_id="accept")
                            reject = gr.Button(t("reject"), variant="stop", elem_id="reject")
                        reason = gr.Textbox(label=t("reason"), elem_id="reason", max_lines=1)
                        with gr.Row():
                            diameter = gr.Number(
                                label=t("diameter_mm"), elem_id="diameter", minimum=0
                            )
                            edit = gr.Button(t("edit_diameter"), elem_id="edit")
                        with gr.Row():
                            sign = gr.Button(t("sign"), variant="primary", elem_id="sign")
                            amend = gr.Button(t("reopen"), elem_id="reopen")
                        message = gr.Markdown("", elem_id="message")
                        with gr.Accordion(t("new_finding"), open=True, elem_id="new-finding"):
                            gr.Markdown(t("mark_hint"))
                            point = gr.Markdown("", elem_id="clicked-point")
                            with gr.Row():
                                new_diameter = gr.Number(
                                    label=t("new_diameter_mm"), elem_id="new-diameter", minimum=0
                                )
                                add = gr.Button(t("add_finding"), elem_id="add")
                            remove = gr.Button(t("remove"), elem_id="remove", size="sm")
                        gallery = gr.Gallery(
                            label=t("thumbnails"),
                            columns=4,
                            height=140,
                            elem_id="thumbnails",
                            allow_preview=False,
                            buttons=[],
                        )
                        gr.Markdown(f"<small>{t('viewer_help')}</small>", elem_id="viewer-help")
            with gr.Tab(
                t("tab_dashboard"), id="dashboard", elem_id="tab-dashboard"
            ) as dashboard_page:
                load_dashboard, dashboard_outputs = dashboard_tab(ctx, t, current_user)
            with gr.Tab(
                t("tab_audit"), id="audit", elem_id="tab-audit", visible=False
            ) as audit_tab:
                load_audit, audit_outputs = audit_tab_contents(ctx, t, current_user)

        decision_buttons = [accept, reject, edit, add, remove, sign]
        viewer_outputs = [
            state,
            viewer_status,
            meta,
            findings,
            gallery,
            selected,
            diameter,
            new_diameter,
            point,
            message,
            *decision_buttons,
            amend,
        ]

        def view(
            st: ViewerState,
            msg: str = "",
            *,
            edit_mm: float | None = None,
            new_mm: float | None = None,
        ) -> tuple[Any, ...]:
            """Every viewer output for ``st``; a measured diameter goes to the box it is for."""
            banner = patient_banner(ctx, st, t)
            signed = st.state == "signed"
            editable = st.review_id is not None and not signed
            return (
                st,
                f"{banner} · {st.status_line(t)}" if banner else st.status_line(t),
                viewer_meta(st, lang, slider_value(ctx, st)),
                highlighted(findings_table(ctx, st, t), st.selected),
                thumbnails(ctx, st),
                st.selected_line(t),
                edit_mm if edit_mm is not None else st.selected_diameter(ctx),
                new_mm if new_mm is not None else gr.skip(),
                st.point_line(ctx, t),
                msg,
                *(gr.update(interactive=editable) for _ in decision_buttons),
                gr.update(interactive=signed),
            )

        blocks.load(on_load, None, [header, audit_tab, table])
        dashboard_page.select(load_dashboard, None, dashboard_outputs)
        audit_tab.select(load_audit, None, audit_outputs)
        for trigger in (
            refresh.click,
            status.change,
            sort.change,
            search.submit,
            worklist_page.select,
        ):
            trigger(worklist, [status, search, sort], table)

        @guarded([*viewer_outputs, tabs])
        def on_open(st: ViewerState, evt: gr.SelectData, request: gr.Request) -> Any:
            user = current_user(ctx, request)
            row = evt.row_value if evt.row_value is not None else None
            review_id = int(row[0]) if row else None
            if review_id is None:
                raise ReviewError(t("open_hint"))
            st = open_review(ctx, user, review_id, client=_client(request))
            return (*view(st), gr.Tabs(selected="viewer"))

        table.select(on_open, [state], [*viewer_outputs, tabs])

        @guarded(viewer_outputs)
        def on_command(st: ViewerState, sent: str, request: gr.Request) -> Any:
            """What the viewer script asks: select a finding (keys n/p), mark a point (a
            click), a caliper measurement (for the selected finding or a new one)."""
            current_user(ctx, request)
            cmd = viewer_command(sent, t("bad_command"))
            if cmd.op == "select":
                st.select(ctx, cmd.key)
                return view(st)
            set_slider(ctx, st, cmd.pos + 1)
            if cmd.op == "measure" and cmd.target == "selected":
                msg = t("measured_selected", mm=cmd.mm, finding=st.selected or "")
                return view(st, msg, edit_mm=cmd.mm)
            click_point(ctx, st, row=cmd.row, col=cmd.col)
            if cmd.op == "measure":
                return view(st, t("measured_new", mm=cmd.mm), new_mm=cmd.mm)
            return view(st)

        command_send.click(on_command, [state, command], viewer_outputs)

        @guarded(viewer_outputs)
        def on_finding(st: ViewerState, evt: gr.SelectData, request: gr.Request) -> Any:
            current_user(ctx, request)
            row = evt.row_value
            if row:
                st.select(ctx, str(row[0]))
            return view(st)

        findings.select(on_finding, [state], viewer_outputs)

        @guarded(viewer_outputs)
        def on_thumbnail(st: ViewerState, evt: gr.SelectData, request: gr.Request) -> Any:
            current_user(ctx, request)
            keys = [k for k, _ in st.thumbnail_keys]
            if isinstance(evt.index, int) and 0 <= evt.index < len(keys):
                st.select(ctx, keys[evt.index])
            return view(st)

        gallery.select(on_thumbnail, [state], viewer_outputs)

        def decision(action: str) -> Any:
            @guarded([*viewer_outputs, reason])
            def run(st: ViewerState, why: str, d: float | None, request: gr.Request) -> Any:
                user = current_user(ctx, request)
                what = decide(
                    ctx, st, user, action, reason=why, diameter_mm=d, client=_client(request)
                )
                return (*view(st, t("saved", what=what)), "")

            return run

        for button, action in (
            (accept, "accept"),
            (reject, "reject"),
            (edit, "edit"),
            (remove, "remove"),
        ):
            button.click(decision(action), [state, reason, diameter], [*viewer_outputs, reason])

        @guarded(viewer_outputs)
        def on_add(st: ViewerState, d: float | None, request: gr.Request) -> Any:
            user = current_user(ctx, request)
            what = add_finding(ctx, st, user, d, client=_client(request))
            return view(st, t("saved", what=what), new_mm=0.0)

        add.click(on_add, [state, new_diameter], viewer_outputs)

        @guarded(viewer_outputs)
        def on_sign(st: ViewerState, request: gr.Request) -> Any:
            user = current_user(ctx, request)
            result = sign_review(ctx, st, user, client=_client(request))
            sent_to = [*result.destinations, *(["FHIR"] if result.fhir_queued else [])]
            if sent_to:
                msg = t("signed_ok", uid=result.sr_uid, destinations=", ".join(sent_to))
            else:
                msg = t("signed_no_destination", uid=result.sr_uid)
            return view(st, msg)

        sign.click(on_sign, [state], viewer_outputs)

        @guarded(viewer_outputs)
        def on_reopen(st: ViewerState, request: gr.Request) -> Any:
            user = current_user(ctx, request)
            reopen(ctx, st, user, client=_client(request))
            return view(st)

        amend.click(on_reopen, [state], viewer_outputs)

    return blocks, viewer_script() + f"<style>{CSS}{VIEWER_CSS}</style>"


def _client(request: gr.Request) -> str | None:
    client = getattr(request, "client", None)
    return getattr(client, "host", None)
