"""One browser session's viewer: which review is open, the slice, window, selected finding and
the point clicked for a missed finding; and the actions on it (ui/app.py wires them to Gradio).

Opened studies are kept in a small cache of :class:`ui.viewer.StudyView`, shared by sessions
(opening a 300-slice series reads 300 files: seconds on a small machine), and the worklist's next
studies are opened ahead in the background (:func:`prewarm`), so that a click opens from memory.
"""

from __future__ import annotations

import html
import io
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import NDArray
from PIL import Image

from aidx.doorbell import RESULTS, ring
from inference.fhir_report import fhir_settings
from ui import challenger
from ui.accounts import User
from ui.review import ReviewCase, ReviewedFinding, ReviewError
from ui.signoff import sign
from ui.viewer import WINDOW_PRESETS, StudyView

CACHE_SIZE = 4
PREWARM = 2  # studies of the worklist opened ahead, in the background
ADDED_COLOUR = (255, 255, 255)
POINT_COLOUR = (255, 255, 0)
T = Callable[..., str]

# Keyed by (store, review): review ids are per store, and one process may serve several stores.
_cache: OrderedDict[tuple[str, int], StudyView] = OrderedDict()
_opening: dict[tuple[str, int], Future[StudyView]] = {}  # studies being opened now
_cache_lock = threading.Lock()
_prewarmer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="aidx-prewarm")
log = logging.getLogger("aidx.ui.viewer_session")


@dataclass
class ViewerState:
    review_id: int | None = None
    slice: int = 0  # 0-based volume index (along the slice normal; see StudyView.slice_at)
    slice_count: int = 0
    preset: str = "lung"
    window: float = WINDOW_PRESETS["lung"].window
    level: float = WINDOW_PRESETS["lung"].level
    overlays: bool = True
    selected: str | None = None  # finding key
    point: tuple[int, float, float, float, float, float] | None = None  # k, row, col, x, y, z
    state: str = ""
    study_uid: str = ""
    goto: int = 0  # counts the server's moves of the view (a finding selected): the page follows
    thumbnail_keys: list[tuple[str, str]] = field(default_factory=list)
    challenger: bool = False  # an engineer's view: a shadow challenger's findings too

    def status_line(self, t: T) -> str:
        if self.review_id is None:
            return t("no_study")
        state = t("review_state", state=t(f"status_{self.state}"))
        return f"**{state}** · <small>{self.study_uid}</small>"

    def selected_line(self, t: T) -> str:
        return f"**{t('selected')}:** {self.selected}" if self.selected else t("select_first")

    def point_line(self, ctx: Any, t: T) -> str:
        if self.point is None or self.review_id is None:
            return ""
        k, _, _, x, y, z = self.point
        return t("clicked_at", image=image_label(study_view(ctx, self.review_id), k), x=x, y=y, z=z)

    def selected_diameter(self, ctx: Any) -> float | None:
        if self.review_id is None or self.selected is None:
            return None
        for f in ctx.reviews.findings(self.review_id):
            if f.key == self.selected:
                return round(float(f.diameter_mm), 1)
        return None

    def select(self, ctx: Any, key: str) -> None:
        """Select a finding and jump to its slice."""
        if self.review_id is None:
            raise ReviewError("open a study first")
        shadow = {f"{challenger.PREFIX}{c.id}": c for _, c in _challenger(ctx, self)}
        if key in shadow:  # a challenger's finding: its slice, nothing to decide
            view = study_view(ctx, self.review_id)
            k = view.patient_to_pixel(shadow[key].center_mm)[0]
            self.slice = int(min(max(round(k), 0), view.slice_count - 1))
            self.goto += 1
            return
        found = {f.key: f for f in ctx.reviews.findings(self.review_id)}
        if key not in found:
            raise ReviewError(f"no finding {key}")
        self.selected = key
        self.slice = finding_slice(study_view(ctx, self.review_id), found[key])
        self.goto += 1


def study_view(ctx: Any, review_id: int) -> StudyView:
    """The review's series, findings and contours, from the cache or opened now (a second
    request for a study being opened, by a user or by :func:`prewarm`, waits for that one)."""
    key = (str(ctx.store.engine.url), review_id)
    with _cache_lock:
        view = _cache.get(key)
        if view is not None:
            _cache.move_to_end(key)
            return view
        pending = _opening.get(key)
        if pending is None:
            pending = _opening[key] = Future()
            pending.set_running_or_notify_cancel()
            owner = True
        else:
            owner = False
    if not owner:
        return pending.result()  # the opener's view, or its exception
    try:
        view = _open_view(ctx, review_id)
    except BaseException as exc:
        with _cache_lock:
            _opening.pop(key, None)
        pending.set_exception(exc)
        raise
    with _cache_lock:
        _cache[key] = view
        _opening.pop(key, None)
        while len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)
    pending.set_result(view)
    return view


def _open_view(ctx: Any, review_id: int) -> StudyView:
    case: ReviewCase = ctx.reviews.case(review_id)
    files = [
        row["path"]
        for row in ctx.store.study_instances(case.study_uid)
        if _series_of(row) in (None, case.series_uid)
    ]
    return StudyView.open(files, case.findings_path, case.seg_path)


def prewarm(ctx: Any, review_ids: list[int]) -> None:
    """Open the first PREWARM of these reviews in the background (the worklist's next studies),
    so that the study a radiologist picks opens from the cache. Failures are logged by UID."""
    for review_id in review_ids[:PREWARM]:
        key = (str(ctx.store.engine.url), review_id)
        with _cache_lock:
            if key in _cache or key in _opening:
                continue
        _prewarmer.submit(_prewarm_one, ctx, review_id)


def _prewarm_one(ctx: Any, review_id: int) -> None:
    try:
        study_view(ctx, review_id)
    except (ValueError, ReviewError, OSError) as exc:  # the user's own open says it again
        log.warning("prewarming review %d failed: %s", review_id, exc)


def _series_of(row: dict[str, Any]) -> str | None:
    value = row.get("series_uid")
    return str(value) if value else None


def finding_slice(view: StudyView, finding: ReviewedFinding) -> int:
    if finding.ai is not None:
        return view.finding_slice(finding.ai.id)
    k, _, _ = view.patient_to_pixel(finding.center_mm)
    return int(min(max(round(k), 0), view.slice_count - 1))


def open_review(ctx: Any, user: User, review_id: int, client: str | None) -> ViewerState:
    case = ctx.reviews.open(review_id, user, client)
    view = study_view(ctx, review_id)
    st = ViewerState(
        review_id=review_id,
        slice_count=view.slice_count,
        state=case.state,
        study_uid=case.study_uid,
        challenger=user.role in challenger.ROLES,
    )
    found = ctx.reviews.findings(review_id)
    if found:
        st.selected = found[0].key
        st.slice = finding_slice(view, found[0])
    else:
        st.slice = view.slice_count // 2
    return st


def image_label(view: StudyView, k: int) -> str:
    """The slice's image number as the PACS shows it (its Instance Number), or, without one,
    its place in the scroll order."""
    number = view.instance_number(k)
    return str(number) if number is not None else str(view.display_position(k) + 1)


def slider_value(ctx: Any, st: ViewerState) -> int:
    """The slice's 1-based place in the scroll order (the slider's value)."""
    if st.review_id is None:
        return 1
    return study_view(ctx, st.review_id).display_position(st.slice) + 1


def set_slider(ctx: Any, st: ViewerState, value: float) -> None:
    """Go to the slice at a 1-based scroll position (the slider's value)."""
    if st.review_id is not None:
        st.slice = study_view(ctx, st.review_id).slice_at(int(value) - 1)


def person_name(value: str) -> str:
    """A DICOM PN as a viewer shows it: ``FAMILY, Given Middle`` for each component group
    (alphabetic, ideographic, phonetic), the other groups in parentheses; ``^`` never shown."""
    shown: list[str] = []
    for group in value.split("="):
        family, given, middle, prefix, suffix = ([*group.split("^"), "", "", "", ""])[:5]
        rest = " ".join(p.strip() for p in (given, middle) if p.strip())
        name = ", ".join(p for p in (family.strip(), rest) if p)
        name = " ".join(p.strip() for p in (prefix, name, suffix) if p.strip())
        if name and name not in shown:
            shown.append(name)
    if not shown:
        return ""
    return shown[0] + "".join(f" ({other})" for other in shown[1:])


def dicom_date(value: str) -> str:
    """YYYYMMDD as YYYY-MM-DD (anything else as it came)."""
    v = value.strip()
    return f"{v[:4]}-{v[4:6]}-{v[6:8]}" if len(v) == 8 and v.isdigit() else v


def patient_banner(ctx: Any, st: ViewerState, t: T) -> str:
    """Who the images are of, as every PACS viewer shows it beside the image: name, ID, birth
    date and sex, accession, study date and description (Markdown, escaped)."""
    if st.review_id is None:
        return ""
    who = ctx.reviews.identification(st.review_id)

    def esc(text: str) -> str:
        return html.escape(text).replace("*", "\\*").replace("_", "\\_").replace("`", "")

    parts = [
        f"**{esc(person_name(who.patient_name)) or t('unknown_patient')}**",
        t("banner_id", id=esc(who.patient_id)) if who.patient_id else "",
        t("banner_born", date=esc(dicom_date(who.birth_date))) if who.birth_date else "",
        t("banner_sex", sex=esc(who.sex)) if who.sex else "",
        t("banner_accession", accession=esc(who.accession_number)) if who.accession_number else "",
        esc(dicom_date(who.study_date)),
        esc(who.description),
    ]
    return " · ".join(p for p in parts if p)


def slice_info(ctx: Any, st: ViewerState, t: T) -> str:
    """What the PACS overlay says about the slice: image number, place, slice location."""
    if st.review_id is None:
        return ""
    view = study_view(ctx, st.review_id)
    return t(
        "slice_info",
        image=image_label(view, st.slice),
        position=view.display_position(st.slice) + 1,
        count=view.slice_count,
        location=view.slice_location(st.slice),
    )


def render_slice(ctx: Any, st: ViewerState) -> NDArray[np.uint8] | None:
    """The slice on screen as RGB: windowed, with what :func:`draw_marks` draws."""
    if st.review_id is None:
        return None
    view = study_view(ctx, st.review_id)
    st.slice = int(min(max(st.slice, 0), view.slice_count - 1))
    rgb = view.render(st.slice, st.window, st.level, overlays=False)
    draw_marks(ctx, st, view, rgb)
    return rgb


def render_marks(ctx: Any, st: ViewerState) -> NDArray[np.uint8] | None:
    """Only the marks of the slice on screen, as RGBA on a transparent background: what the
    page's viewer lays over the slice it windows itself (ui/viewer.js)."""
    if st.review_id is None:
        return None
    view = study_view(ctx, st.review_id)
    st.slice = int(min(max(st.slice, 0), view.slice_count - 1))
    rgb = np.zeros((*view.shape, 3), dtype=np.uint8)  # no mark is drawn in (0, 0, 0)
    draw_marks(ctx, st, view, rgb)
    rgba = np.empty((*view.shape, 4), dtype=np.uint8)
    rgba[..., :3] = rgb
    drawn = (rgb[..., 0] | rgb[..., 1] | rgb[..., 2]) != 0
    np.multiply(drawn, 255, out=rgba[..., 3], casting="unsafe")
    return rgba


def draw_marks(ctx: Any, st: ViewerState, view: StudyView, rgb: NDArray[np.uint8]) -> None:
    """Into ``rgb`` in place: the findings' contours, boxes and ids, the added findings'
    circles (``st.overlays``), and the marked point's cross."""
    assert st.review_id is not None
    found = ctx.reviews.findings(st.review_id)
    selected_ai = next((f.ai.id for f in found if f.key == st.selected and f.ai is not None), None)
    if st.overlays:
        view.draw_overlays(rgb, st.slice, selected_ai)
        for f in found:
            if f.source == "added" and f.status != "removed":
                _draw_sphere_section(
                    rgb, view, st.slice, f.center_mm, f.diameter_mm, thick=f.key == st.selected
                )
        for _, c in _challenger(ctx, st):
            _draw_sphere_section(
                rgb, view, st.slice, c.center_mm, c.diameter_mm, False, challenger.COLOUR
            )
    if st.point is not None and st.point[0] == st.slice:
        _draw_cross(rgb, st.point[1], st.point[2])


def slice_png_bytes(ctx: Any, st: ViewerState, marks_only: bool = False) -> bytes | None:
    """:func:`render_slice` (or :func:`render_marks`) as PNG bytes (fast compression), for the
    direct slice routes."""
    rgb = render_marks(ctx, st) if marks_only else render_slice(ctx, st)
    if rgb is None:
        return None
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def viewer_meta(st: ViewerState, lang: str, position: int = 1) -> str:
    """What the page's scrolling script needs to fetch slices itself (ui/app.py, SCROLL_JS):
    the review, the slice count, window, level, overlays, the selected finding, the marked
    point, the language, the position rendered. Hidden; no patient data."""
    if st.review_id is None:
        return "<span></span>"
    k, row, col = st.point[:3] if st.point is not None else (-1, 0.0, 0.0)
    values = {
        "review": st.review_id,
        "count": st.slice_count,
        "w": f"{st.window:g}",
        "l": f"{st.level:g}",
        "ov": int(st.overlays),
        "sel": st.selected or "",
        "pt": f"{k},{row:g},{col:g}",  # the marked point (its cross), k = -1: none
        "lang": lang,
        "pos": position,  # the slice's 1-based scroll position in this render
        "goto": st.goto,  # a new value: the page moves to pos (and the selected finding)
        # New with every server render: slices fetched before (other decisions, an added
        # finding) are not reused.
        "rev": time.monotonic_ns(),
    }
    attributes = " ".join(f'data-{k}="{html.escape(str(v))}"' for k, v in values.items())
    return f"<span {attributes}></span>"


def _draw_sphere_section(
    rgb: NDArray[np.uint8],
    view: StudyView,
    k: int,
    center: tuple[float, float, float],
    diameter: float,
    thick: bool,
    colour: tuple[int, int, int] = ADDED_COLOUR,
) -> None:
    """The circle where the added finding's sphere cuts slice ``k`` (nothing off the sphere)."""
    ck, cr, cc = view.patient_to_pixel(center)
    dz = abs(k - ck) * view.volume.spacing[0]
    radius_mm = diameter / 2.0
    if dz > radius_mm:
        return
    r_mm = float(np.sqrt(max(radius_mm**2 - dz**2, 0.0)))
    rows, cols = rgb.shape[:2]
    angles = np.linspace(0, 2 * np.pi, 180, endpoint=False)
    width = 2 if thick else 1
    for w in range(width):
        rr = cr + (r_mm / view.volume.spacing[1] + w) * np.sin(angles)
        cc_ = cc + (r_mm / view.volume.spacing[2] + w) * np.cos(angles)
        ok = (rr >= 0) & (rr < rows) & (cc_ >= 0) & (cc_ < cols)
        rgb[rr[ok].astype(int), cc_[ok].astype(int)] = colour


def _draw_cross(rgb: NDArray[np.uint8], row: float, col: float, size: int = 6) -> None:
    rows, cols = rgb.shape[:2]
    r, c = round(row), round(col)
    rgb[max(r - size, 0) : min(r + size + 1, rows), min(max(c, 0), cols - 1)] = POINT_COLOUR
    rgb[min(max(r, 0), rows - 1), max(c - size, 0) : min(c + size + 1, cols)] = POINT_COLOUR


def findings_table(ctx: Any, st: ViewerState, t: T) -> pd.DataFrame:
    columns = [
        t("col_finding"),
        t("col_decision"),
        t("col_diameter"),
        t("col_volume"),
        t("col_probability"),
        t("col_slice"),
    ]
    if st.review_id is None:
        return pd.DataFrame([], columns=columns)
    view = study_view(ctx, st.review_id)
    rows = []
    for f in ctx.reviews.findings(st.review_id):
        rows.append(
            [
                f.key,
                t(f"decision_{f.status}") + (f" ({_short(f.reason)})" if f.reason else ""),
                round(f.diameter_mm, 1),
                round(f.ai.volume_mm3, 0) if f.ai is not None else None,
                round(f.ai.probability, 3) if f.ai is not None else None,
                image_label(view, finding_slice(view, f)),
            ]
        )
    for model, c in _challenger(ctx, st):
        k, _, _ = view.patient_to_pixel(c.center_mm)
        rows.append(
            [
                f"{challenger.PREFIX}{c.id}",
                t("decision_challenger", model=model),
                round(c.diameter_mm, 1),
                round(c.volume_mm3, 0),
                round(c.probability, 3),
                image_label(view, int(min(max(round(k), 0), view.slice_count - 1))),
            ]
        )
    return pd.DataFrame(rows, columns=columns)


def _challenger(ctx: Any, st: ViewerState) -> list[tuple[str, Any]]:
    """A shadow challenger's findings beside the review's, in an engineer's view only."""
    if not st.challenger or st.review_id is None:
        return []
    return challenger.challenger_findings(ctx.reviews._store, ctx.reviews.case(st.review_id))


def _short(reason: str, limit: int = 14) -> str:
    """A rejection reason short enough to leave the table's measurements in view."""
    return reason if len(reason) <= limit else reason[: limit - 1] + "…"


def highlighted(table: pd.DataFrame, selected: str | None) -> Any:
    """The findings table with the selected finding's row highlighted (a pandas Styler)."""

    def row_style(row: pd.Series) -> list[str]:
        on = selected is not None and row.iloc[0] == selected
        style = "background-color: #1e3a8a; color: #ffffff; font-weight: 600" if on else ""
        return [style] * len(row)

    digits = dict(zip(table.columns[2:5], ("{:.1f}", "{:.0f}", "{:.3f}"), strict=True))
    return table.style.apply(row_style, axis=1).format(digits, na_rep="")


def thumbnails(ctx: Any, st: ViewerState) -> list[tuple[NDArray[np.uint8], str]]:
    if st.review_id is None:
        return []
    view = study_view(ctx, st.review_id)
    out = []
    st.thumbnail_keys = []
    for f in ctx.reviews.findings(st.review_id):
        if f.ai is not None:
            out.append((view.thumbnail(f.ai.id, size=96), f.key))
            st.thumbnail_keys.append((f.key, f.status))
    return out


def decide(
    ctx: Any,
    st: ViewerState,
    user: User,
    action: str,
    *,
    reason: str | None,
    diameter_mm: float | None,
    client: str | None,
) -> str:
    if st.review_id is None or st.selected is None:
        raise ReviewError("select a finding first")
    done = ctx.reviews.decide(
        st.review_id,
        st.selected,
        action,
        user,
        reason=reason if action == "reject" else None,
        diameter_mm=diameter_mm if action == "edit" else None,
        client=client,
    )
    st.state = ctx.reviews.case(st.review_id).state
    return f"{done.key} {done.status}"


def click_point(ctx: Any, st: ViewerState, row: float, col: float) -> None:
    if st.review_id is None:
        raise ReviewError("open a study first")
    view = study_view(ctx, st.review_id)
    x, y, z = view.pixel_to_patient(st.slice, row, col)
    st.point = (st.slice, row, col, x, y, z)


def add_finding(
    ctx: Any, st: ViewerState, user: User, diameter_mm: float | None, client: str | None
) -> str:
    if st.review_id is None:
        raise ReviewError("open a study first")
    if st.point is None:
        raise ReviewError("click the image where the finding is first")
    added = ctx.reviews.add(st.review_id, st.point[3:], diameter_mm or 0.0, user, client)
    st.selected, st.point = added.key, None
    st.state = ctx.reviews.case(st.review_id).state
    return f"{added.key} ({added.diameter_mm:.1f} mm)"


def sign_review(ctx: Any, st: ViewerState, user: User, client: str | None) -> Any:
    if st.review_id is None:
        raise ReviewError("open a study first")
    result = sign(
        ctx.reviews,
        ctx.store,
        st.review_id,
        user,
        ctx.config.storage_root() / "signed",
        fallback_destinations=ctx.config.ui.signoff_destinations,
        client=client,
        default_organisation=ctx.config.ui.organisation,
        fhir=fhir_settings(ctx.config, "final"),
    )
    if result.destinations or result.fhir_queued:
        ring(ctx.config.data_dir, RESULTS)  # the outbox process sends now, not at its next look
    st.state = ctx.reviews.case(st.review_id).state
    return result


def reopen(ctx: Any, st: ViewerState, user: User, client: str | None) -> None:
    if st.review_id is None:
        raise ReviewError("open a study first")
    st.state = ctx.reviews.reopen(st.review_id, user, client).state
