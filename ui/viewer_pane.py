"""The viewer's markup, style and script: a dark reading pane whose canvas ui/viewer.js draws
(windowing, zoom, pan, reformats, caliper in the browser), with the corner text PACS viewers
show, a toolbar, a scroll bar and a loading indicator. ui/app.py places it in the viewer tab."""

from __future__ import annotations

import html
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

T = Callable[..., str]


@cache
def viewer_script() -> str:
    """ui/viewer.js inside a script element, for the page's head."""
    source = (Path(__file__).with_name("viewer.js")).read_text(encoding="utf-8")
    return f"<script>\n{source}\n</script>"


def viewer_markup(t: T) -> str:
    """The pane: toolbar, canvas with its four corners, scroll bar, loading indicators."""
    words = {
        key: t(f"viewer_{key}")
        for key in (
            "unknown_patient",
            "id",
            "accession",
            "image_of",
            "location",
            "thickness",
            "series",
            "zoom",
            "plane_coronal",
            "plane_sagittal",
            "bad_window",
        )
    }

    def button(label: str, attribute: str, value: str, key: str = "") -> str:
        shortcut = f" title='{html.escape(t('viewer_key', shortcut=key))}'" if key else ""
        return (
            f"<button type='button' data-{attribute}='{value}'{shortcut}>"
            f"{html.escape(label)}</button>"
        )

    planes = "".join(
        button(t(f"viewer_plane_{p}"), "plane", p, "v") for p in ("axial", "coronal", "sagittal")
    )
    presets = "".join(
        button(t(f"preset_{p}"), "preset", p, str(i + 1))
        for i, p in enumerate(("lung", "mediastinum", "bone"))
    )
    toggles = (
        button(t("viewer_contours"), "toggle", "overlays", "o")
        + button(t("viewer_info"), "toggle", "info", "i")
        + button(t("viewer_caliper"), "toggle", "measure", "m")
        + button(t("viewer_reset"), "action", "reset", "r")
    )
    return (
        "<div id='aidx-toolbar' class='aidx-tools'>"
        f"<span class='aidx-group'>{planes}</span>"
        f"<span class='aidx-group'>{presets}</span>"
        "<span class='aidx-group'>"
        f"<label>W <input id='aidx-ww' type='number' min='1' step='1' value='1500' "
        f"aria-label='{html.escape(t('window_width'))}'></label>"
        f"<label>L <input id='aidx-wl' type='number' step='1' value='-600' "
        f"aria-label='{html.escape(t('window_level'))}'></label></span>"
        f"<span class='aidx-group'>{toggles}</span>"
        "</div>"
        f"<div id='aidx-viewer' tabindex='0' data-words='{html.escape(json.dumps(words))}'>"
        "<canvas id='aidx-canvas'></canvas>"
        "<pre id='aidx-tl' class='aidx-corner'></pre><pre id='aidx-tr' class='aidx-corner'></pre>"
        "<pre id='aidx-bl' class='aidx-corner'></pre><pre id='aidx-br' class='aidx-corner'></pre>"
        f"<div id='aidx-loading' hidden>{html.escape(t('viewer_loading'))}</div>"
        f"<div id='aidx-empty'>{html.escape(t('no_study'))}</div>"
        "</div>"
        "<div id='aidx-scrollbar' class='aidx-tools'>"
        f"{button('▲', 'action', 'prev', '↑')}"
        "<input id='aidx-scroll' type='range' min='1' max='2' value='1' "
        f"aria-label='{html.escape(t('slice'))}'>"
        f"{button('▼', 'action', 'next', '↓')}"
        "<span id='aidx-slice-info'></span><span id='aidx-note'></span>"
        "</div>"
        f"<div id='aidx-opening' hidden>{html.escape(t('viewer_opening'))}</div>"
    )


# Dark reading pane; the page is Gradio's dark theme (ui/web.py asks for it).
VIEWER_CSS = """
#aidx-toolbar, #aidx-scrollbar { display: flex; flex-wrap: wrap; gap: 4px 6px;
  align-items: center; font-size: 13px; margin: 2px 0; }
.aidx-group { display: inline-flex; gap: 2px; margin-right: 4px; align-items: center; }
.aidx-tools button { padding: 1px 8px !important; border: 1px solid #4b5563; border-radius: 4px;
  background: #1f2937; color: #e5e7eb; cursor: pointer; font-size: 13px !important;
  font-weight: 500 !important; line-height: 1.5 !important; min-width: 0 !important; }
.aidx-tools button.aidx-on { background: #2563eb; border-color: #3b82f6; color: #fff; }
#aidx-toolbar input { width: 64px; background: #111827; color: #e5e7eb;
  border: 1px solid #4b5563; border-radius: 4px; padding: 1px 4px; }
#aidx-viewer { position: relative; background: #000; height: calc(100vh - 150px);
  min-height: 320px; outline: none; user-select: none; overflow: hidden; }
#aidx-viewer:focus-visible { box-shadow: inset 0 0 0 1px #3b82f6; }
#aidx-canvas { width: 100%; height: 100%; display: block; cursor: crosshair; }
.aidx-corner { position: absolute; margin: 0; padding: 4px 8px; color: #e5e7eb;
  font: 12px/1.35 ui-monospace, monospace; text-shadow: 0 0 3px #000, 0 0 2px #000;
  pointer-events: none; white-space: pre; background: transparent; border: 0; }
#aidx-tl { top: 0; left: 0; } #aidx-tr { top: 0; right: 0; text-align: right; }
#aidx-bl { bottom: 0; left: 0; } #aidx-br { bottom: 0; right: 0; text-align: right; }
#aidx-viewer.aidx-no-info .aidx-corner { display: none; }
#aidx-viewer[data-pos] #aidx-empty { display: none; }
#aidx-empty { position: absolute; inset: 0; display: flex; align-items: center;
  justify-content: center; color: #9ca3af; pointer-events: none; }
#aidx-loading { position: absolute; top: 45%; left: 0; right: 0; text-align: center;
  color: #fbbf24; font-weight: 600; pointer-events: none; }
#aidx-opening { position: fixed; top: 12px; left: 50%; transform: translateX(-50%);
  z-index: 1000; background: #1e3a8a; color: #fff; padding: 8px 16px; border-radius: 6px; }
#aidx-scroll { flex: 1; min-width: 120px; }
#aidx-slice-info { color: #d1d5db; }
#aidx-note { color: #fbbf24; }
#review-panel { max-height: calc(100vh - 90px); overflow-y: auto; gap: 8px; }
#review-panel button { padding: 4px 10px; font-size: 14px; }
#findings { font-size: 13px; }
.gradio-container { padding-top: 4px !important; }
#findings .selected-row, #message p { font-weight: 600; }
#message p { color: #fbbf24; }
"""


@dataclass(frozen=True)
class ViewerCommand:
    """One request of the viewer script (#viewer-command): ``select`` a finding by key,
    ``point`` (a click: scroll position, row, column) or ``measure`` (a caliper line: its
    length, for the ``selected`` finding or a ``new`` one at the line's middle)."""

    op: str
    key: str = ""
    pos: int = 0
    row: float = 0.0
    col: float = 0.0
    mm: float = 0.0
    target: str = "new"


def viewer_command(sent: str, refusal: str) -> ViewerCommand:
    """The command in ``sent`` (JSON), checked; anything else raises ValueError(refusal)."""
    try:
        raw = json.loads(sent)
        if not isinstance(raw, dict):
            raise ValueError(refusal)
        op = raw.get("op")
        if op == "select":
            key = raw.get("key")
            if not isinstance(key, str) or not 0 < len(key) <= 64:
                raise ValueError(refusal)
            return ViewerCommand("select", key=key)
        if op not in ("point", "measure"):
            raise ValueError(refusal)
        pos = raw.get("pos")
        if isinstance(pos, bool) or not isinstance(pos, int) or not 0 <= pos < 2**31:
            raise ValueError(refusal)
        numbers = [raw.get(k, 0.0) for k in ("row", "col", "mm")]
        if not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            for v in numbers
        ):
            raise ValueError(refusal)
        row, col, mm = (float(v) for v in numbers)
        target = raw.get("target", "new")
        if op == "measure" and (target not in ("selected", "new") or not 0.0 < mm < 1000.0):
            raise ValueError(refusal)
        return ViewerCommand(op, pos=pos, row=row, col=col, mm=round(mm, 1), target=target)
    except (json.JSONDecodeError, TypeError) as exc:
        raise ValueError(refusal) from exc
