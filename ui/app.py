"""The review app's pages (Gradio Blocks), built once per interface language by ui/web.py.

Tabs: worklist (sortable, filterable), viewer with findings panel (decisions saved as they are
made), dashboard, and the audit log (administrators). Handlers get the signed-in user from the
request (the session gate put it there; Gradio's auth_dependency names it) and check the role
on the server for every action: hiding a tab is a convenience, not the protection.
"""

from __future__ import annotations

import functools
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
from ui.viewer import WINDOW_PRESETS
from ui.viewer_session import (
    ViewerState,
    add_finding,
    click_point,
    decide,
    findings_table,
    open_review,
    patient_banner,
    reopen,
    set_slider,
    sign_review,
    slice_info,
    slice_png,
    slider_value,
    thumbnails,
    viewer_meta,
)

log = logging.getLogger("aidx.ui.app")

# Up/Down (and PageUp/PageDown, j/k) scroll the slices when the focus is not in a text field, and
# so does the mouse wheel over the image (as in a PACS viewer), one slice per notch, at most one
# step per 60 ms so that a fast wheel does not queue dozens of renders.
KEYBOARD_JS = """
<script>
(() => {
  // Scrolling fetches slices straight from /viewer/slice.png (the server's own rendering) and
  // prefetches the next few in the direction of travel, so a step costs one image swap instead
  // of a Gradio round trip. Each step sets #slice-jump (which a click on the image sends with
  // it); 150 ms after the last step #slice-sync tells the server, whose renders then follow.
  // The position is the page's own (pos): the server's answer to a sync never moves it back,
  // and every step counts from where the last one went; a new server render (a new rev in
  // #viewer-meta: a study opened, a finding selected) brings the server's position.
  // Without a study open (#viewer-meta empty) nothing happens.
  const cache = new Map();
  let shown = 0, timer = null, pos = null, rev = null;
  const meta = () => {
    const m = document.querySelector('#viewer-meta [data-review]');
    return m ? m.dataset : null;
  };
  const sliderInput = () => document.querySelector('#slice input[type=number]');
  const url = (m, pos) => '/viewer/slice.png?review=' + m.review + '&pos=' + pos +
    '&w=' + m.w + '&l=' + m.l + '&ov=' + m.ov + '&sel=' + encodeURIComponent(m.sel) +
    '&pt=' + m.pt + '&lang=' + m.lang + '&rev=' + m.rev;
  const load = (u) => {
    if (!cache.has(u)) {
      cache.set(u, fetch(u, { credentials: 'same-origin' }).then((r) => {
        if (!r.ok) throw new Error('slice ' + r.status);
        const info = decodeURIComponent(r.headers.get('X-Aidx-Slice-Info') || '');
        return r.blob().then((b) => ({ src: URL.createObjectURL(b), info }));
      }));
      if (cache.size > 64) {
        const [key, old] = cache.entries().next().value;
        cache.delete(key);
        old.then((s) => URL.revokeObjectURL(s.src)).catch(() => {});
      }
    }
    return cache.get(u);
  };
  const show = (m, pos) => {
    const ticket = ++shown;
    load(url(m, pos)).then((s) => {
      if (ticket !== shown) return;  // a later step is on its way
      const img = document.querySelector('#slice-image img');
      if (img) img.src = s.src;
      const line = document.querySelector('#slice-info p');
      if (line && s.info) line.textContent = s.info;
    }).catch(() => cache.delete(url(m, pos)));
  };
  const setJump = (value) => {  // the position on screen, which a click on the image uses
    const jump = document.querySelector('#slice-jump input');
    if (!jump) return;
    jump.value = String(value);
    jump.dispatchEvent(new Event('input', { bubbles: true }));
  };
  const sync = () => {
    const button = document.getElementById('slice-sync');
    if (button) button.click();
  };
  window.aidxStep = (delta) => {
    const m = meta(), input = sliderInput();
    if (!m || !input) return false;
    if (m.rev !== rev) {
      rev = m.rev;
      pos = Number(m.pos) || Number(input.value) || 1;
    }
    const count = Number(m.count), current = pos;
    const next = Math.min(Math.max(current + delta, 1), count);
    if (next !== current) {
      pos = next;
      input.value = String(next);
      show(m, next - 1);
      for (let i = 1; i <= 3; i++) {
        const p = next - 1 + i * Math.sign(delta);
        if (p >= 0 && p < count) load(url(m, p));
      }
      setJump(next);
      clearTimeout(timer);
      timer = setTimeout(sync, 150);
    }
    return true;
  };
  document.addEventListener('keydown', (e) => {
    const t = e.target;
    if (t && (t.tagName === 'INPUT' || t.tagName === 'TEXTAREA' || t.isContentEditable)) return;
    if (e.ctrlKey || e.metaKey || e.altKey) return;
    // PACS keys: arrows (and j/k) a slice, PageDown/PageUp ten, Home/End the ends; 1-3 the
    // window presets; o the overlays on or off
    const steps = { ArrowDown: 1, j: 1, ArrowUp: -1, k: -1, PageDown: 10, PageUp: -10,
      End: 1e6, Home: -1e6 };
    if (e.key in steps) {
      if (window.aidxStep(steps[e.key])) e.preventDefault();
      return;
    }
    if (!meta()) return;
    const presets = { 1: 'lung', 2: 'mediastinum', 3: 'bone' };
    if (e.key in presets) {
      const radio = document.querySelector('#preset input[value=' + presets[e.key] + ']');
      if (radio) { radio.click(); e.preventDefault(); }
    } else if (e.key === 'o') {
      const box = document.querySelector('#overlays input[type=checkbox]');
      if (box) { box.click(); e.preventDefault(); }
    }
  });
  let last = 0;
  document.addEventListener('wheel', (e) => {
    const image = document.getElementById('slice-image');
    if (!image || !image.contains(e.target) || e.deltaY === 0) return;
    e.preventDefault();
    const now = performance.now();
    if (now - last < 30) return;
    last = now;
    window.aidxStep(e.deltaY > 0 ? 1 : -1);
  }, { passive: false });
})();
</script>
"""
CSS = """
#slice-image img { image-rendering: pixelated; }
#viewer-hidden { display: none !important; }
.aidx-warning { color: #b45309; font-size: 0.85rem; }
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
    preset_choices = [(t(f"preset_{p}"), p) for p in WINDOW_PRESETS] + [
        (t("preset_manual"), "manual")
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
        data = [
            [
                w.review_id,
                w.priority,
                t(f"status_{w.status}"),
                w.patient_name.replace("^", " ").strip(),
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
        who = t("signed_in_as", name=user.display_name, role=t(f"role_{user.role}"))
        header = (
            f"**{t('title')}** · {who} · "
            # a form, not a Markdown link: Gradio opens links in a new tab, and the old tab
            # kept the worklist with the patients' names on screen
            f"<form method='get' action='/logout' style='display:inline'>"
            f"<button id='log-out' type='submit' style='text-decoration:underline'>"
            f"{t('log_out')}</button></form> · "
            f"<form method='post' action='/language' style='display:inline'>"
            f"<input type='hidden' name='lang' value='{other}'>"
            f"<button id='switch-language' type='submit' style='text-decoration:underline'>"
            f"{LANGUAGE_NAMES[other]}</button></form>"
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
    with gr.Blocks(title=t("title"), analytics_enabled=False, delete_cache=(600, 1800)) as blocks:
        state = gr.State(ViewerState())
        with gr.Row():
            header = gr.Markdown(elem_id="header")
        gr.Markdown(f"<span class='aidx-warning'>{t('not_clinical')}</span>")
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
                with gr.Row():
                    with gr.Column(scale=3):
                        image = gr.Image(
                            label=t("slice"),
                            interactive=False,
                            elem_id="slice-image",
                            show_label=False,
                            format="png",
                            height=600,
                            # no download or share icons over a patient's image: fullscreen only
                            buttons=["fullscreen"],
                        )
                        with gr.Row():
                            prev_button = gr.Button("▲", elem_id="slice-prev", min_width=60)
                            slider = gr.Slider(
                                1, 2, value=1, step=1, label=t("slice"), elem_id="slice"
                            )
                            next_button = gr.Button("▼", elem_id="slice-next", min_width=60)
                        slice_text = gr.Markdown("", elem_id="slice-info")
                        with gr.Row(elem_id="viewer-hidden"):  # for the scrolling script
                            meta = gr.HTML("<span></span>", elem_id="viewer-meta")
                            jump = gr.Number(1, elem_id="slice-jump", precision=0)
                            sync = gr.Button("sync", elem_id="slice-sync")
                        with gr.Row():
                            preset = gr.Radio(
                                preset_choices,
                                value="lung",
                                label=t("window_preset"),
                                elem_id="preset",
                            )
                            width = gr.Number(
                                WINDOW_PRESETS["lung"].window,
                                label=t("window_width"),
                                elem_id="window-width",
                            )
                            level = gr.Number(
                                WINDOW_PRESETS["lung"].level,
                                label=t("window_level"),
                                elem_id="window-level",
                            )
                            overlays = gr.Checkbox(True, label=t("overlays"), elem_id="overlays")
                    with gr.Column(scale=2):
                        findings = gr.Dataframe(
                            label=t("findings"),
                            interactive=False,
                            elem_id="findings",
                        )
                        gallery = gr.Gallery(
                            label=t("thumbnails"),
                            columns=4,
                            height=140,
                            elem_id="thumbnails",
                            allow_preview=False,
                            buttons=[],
                        )
                        selected = gr.Markdown(t("select_first"), elem_id="selected")
                        with gr.Row():
                            accept = gr.Button(t("accept"), variant="primary", elem_id="accept")
                            reject = gr.Button(t("reject"), variant="stop", elem_id="reject")
                        reason = gr.Textbox(label=t("reason"), elem_id="reason")
                        with gr.Row():
                            diameter = gr.Number(
                                label=t("diameter_mm"), elem_id="diameter", minimum=0
                            )
                            edit = gr.Button(t("edit_diameter"), elem_id="edit")
                        gr.Markdown(t("click_to_add"))
                        point = gr.Markdown("", elem_id="clicked-point")
                        with gr.Row():
                            add = gr.Button(t("add_finding"), elem_id="add")
                            remove = gr.Button(t("remove"), elem_id="remove")
                        with gr.Row():
                            sign = gr.Button(t("sign"), variant="primary", elem_id="sign")
                            amend = gr.Button(t("reopen"), elem_id="reopen")
                        message = gr.Markdown("", elem_id="message")
            with gr.Tab(
                t("tab_dashboard"), id="dashboard", elem_id="tab-dashboard"
            ) as dashboard_page:
                load_dashboard, dashboard_outputs = dashboard_tab(ctx, t, current_user)
            with gr.Tab(
                t("tab_audit"), id="audit", elem_id="tab-audit", visible=False
            ) as audit_tab:
                load_audit, audit_outputs = audit_tab_contents(ctx, t, current_user)

        viewer_outputs = [
            state,
            viewer_status,
            image,
            slider,
            slice_text,
            meta,
            jump,
            findings,
            gallery,
            selected,
            diameter,
            point,
            message,
        ]

        def view(st: ViewerState, msg: str = "") -> tuple[Any, ...]:
            banner = patient_banner(ctx, st, t)
            return (
                st,
                f"{banner}\n\n{st.status_line(t)}" if banner else st.status_line(t),
                slice_png(ctx, st),
                gr.update(minimum=1, maximum=max(st.slice_count, 2), value=slider_value(ctx, st)),
                slice_info(ctx, st, t),
                viewer_meta(st, lang, slider_value(ctx, st)),
                slider_value(ctx, st),
                findings_table(ctx, st, t),
                thumbnails(ctx, st),
                st.selected_line(t),
                st.selected_diameter(ctx),
                st.point_line(ctx, t),
                msg,
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

        def rerender(
            st: ViewerState, s: float, p: str, w: float, lv: float, o: bool, request: gr.Request
        ) -> Any:
            current_user(ctx, request)
            set_slider(ctx, st, s)
            st.preset, st.window, st.level, st.overlays = p, float(w or 1), float(lv or 0), o
            shown = (
                slice_png(ctx, st),
                slice_info(ctx, st, t),
                viewer_meta(st, lang, slider_value(ctx, st)),
            )
            return st, *shown, slider_value(ctx, st)

        rendered = [state, image, slice_text, meta, jump]
        slider.input(rerender, [state, slider, preset, width, level, overlays], rendered)
        overlays.change(rerender, [state, slider, preset, width, level, overlays], rendered)

        def on_manual_window(
            st: ViewerState, s: float, w: float, lv: float, o: bool, request: gr.Request
        ) -> Any:
            # a named function with its request: Gradio passes gr.Request only to a parameter
            # annotated with it (a lambda of *args got none and raised a TypeError)
            return ("manual", *rerender(st, s, "manual", w, lv, o, request))

        for number in (width, level):
            number.submit(
                on_manual_window,
                [state, slider, width, level, overlays],
                [preset, *rendered],
            )

        def on_preset(st: ViewerState, p: str, request: gr.Request) -> Any:
            current_user(ctx, request)
            if p in WINDOW_PRESETS:
                st.preset, (st.window, st.level) = p, WINDOW_PRESETS[p]
            meta_now = viewer_meta(st, lang, slider_value(ctx, st))
            return st, st.window, st.level, slice_png(ctx, st), meta_now

        preset.input(on_preset, [state, preset], [state, width, level, image, meta])

        def on_jump(st: ViewerState, value: float, request: gr.Request) -> Any:
            """The scrolling script's position (it showed the slice already)."""
            current_user(ctx, request)
            set_slider(ctx, st, value)
            return st

        # the server follows the page and answers nothing it shows: an answer that set the
        # slider arrived after the next steps and moved the image back a slice
        sync.click(on_jump, [state, jump], [state], trigger_mode="always_last")
        prev_button.click(None, js="() => { window.aidxStep && window.aidxStep(-1); }")
        next_button.click(None, js="() => { window.aidxStep && window.aidxStep(1); }")

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

        @guarded([state, point, image, meta])
        def on_click(
            st: ViewerState, position: float, evt: gr.SelectData, request: gr.Request
        ) -> Any:
            current_user(ctx, request)
            set_slider(ctx, st, position)  # the slice on screen, even mid-scroll
            x, y = evt.index  # column, row of the clicked pixel
            click_point(ctx, st, row=float(y), col=float(x))
            meta_now = viewer_meta(st, lang, slider_value(ctx, st))
            return st, st.point_line(ctx, t), slice_png(ctx, st), meta_now

        image.select(on_click, [state, jump], [state, point, image, meta])

        @guarded(viewer_outputs)
        def on_add(st: ViewerState, d: float | None, request: gr.Request) -> Any:
            user = current_user(ctx, request)
            what = add_finding(ctx, st, user, d, client=_client(request))
            return view(st, t("saved", what=what))

        add.click(on_add, [state, diameter], viewer_outputs)

        @guarded(viewer_outputs)
        def on_sign(st: ViewerState, request: gr.Request) -> Any:
            user = current_user(ctx, request)
            result = sign_review(ctx, st, user, client=_client(request))
            if result.destinations:
                msg = t("signed_ok", uid=result.sr_uid, destinations=", ".join(result.destinations))
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

    return blocks, KEYBOARD_JS + f"<style>{CSS}</style>"


def _client(request: gr.Request) -> str | None:
    client = getattr(request, "client", None)
    return getattr(client, "host", None)
