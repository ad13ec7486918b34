"""``GET /viewer/slice.png``: one slice as PNG for the page's scrolling script (ui/app.py), the
same rendering as the viewer's, without a Gradio round trip.

Only for a review the user has opened in the viewer (that open is the audited study view).
Every query parameter is checked before use (:func:`parse_slice_query`): integers in range
(review ids within 64 bits), finite numbers, a known form; anything else is answered 400 with
what was wrong, never 500.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.responses import Response

from ui import challenger
from ui.accounts import User
from ui.i18n import LANGUAGES, text
from ui.review import ReviewError
from ui.viewer import WINDOW_PRESETS
from ui.viewer_session import ViewerState, slice_info, slice_png_bytes, study_view

VIEWED_MEMORY: Final = 10_000  # (user, review) pairs the route remembers as viewed
REVIEW_ID_MAX: Final = 2**63 - 1  # the store's integer keys
POSITION_MAX: Final = 2**31 - 1  # a scroll position past the series shows its last slice
HU_MAX: Final = 1e6  # window width and level bounds (CT values are a few thousand HU)
PIXEL_MAX: Final = 1e6  # bounds of a marked point's row and column
_INTEGER: Final = re.compile(r"^-?[0-9]{1,20}$")
_NUMBER: Final = re.compile(r"^[+-]?([0-9]{1,20}(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]{1,4})?$")
_FINDING_KEY: Final = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class SliceQueryError(ValueError):
    """A query parameter of the slice route that cannot be used; the message says which."""


@dataclass(frozen=True)
class SliceQuery:
    review: int
    position: int  # 0-based scroll position
    window: float
    level: float
    overlays: bool
    selected: str | None
    point: tuple[int, float, float] | None  # slice index, row, column of the marked point
    lang: str


def _shown(value: str) -> str:
    return repr(value if len(value) <= 40 else value[:40] + "…")


def integer_parameter(name: str, value: str | None, low: int, high: int) -> int:
    if value is None:
        raise SliceQueryError(f"{name} is missing: give an integer {low}..{high}")
    if not _INTEGER.match(value):
        raise SliceQueryError(f"{name}={_shown(value)}: give an integer {low}..{high}")
    number = int(value)
    if not low <= number <= high:
        raise SliceQueryError(f"{name}={_shown(value)} is out of range: {low}..{high}")
    return number


def _number(name: str, value: str | None, low: float, high: float) -> float:
    if value is None:
        raise SliceQueryError(f"{name} is missing: give a number {low:g}..{high:g}")
    number = float(value) if _NUMBER.match(value) else math.nan
    if not math.isfinite(number):
        raise SliceQueryError(f"{name}={_shown(value)}: give a finite number {low:g}..{high:g}")
    if not low <= number <= high:
        raise SliceQueryError(f"{name}={_shown(value)} is out of range: {low:g}..{high:g}")
    return number


def parse_slice_query(params: Mapping[str, str], windowed: bool = True) -> SliceQuery:
    """The slice route's parameters, checked: ``review``, ``pos``, ``w``, ``l`` (required when
    ``windowed``), ``ov`` (0 or 1), ``sel`` (a finding key), ``pt`` (``slice,row,col``; slice
    -1: no point), ``lang``; ``rev`` (the page's cache breaker) is ignored. Raises
    SliceQueryError."""
    review = review_parameter(params)
    position = integer_parameter("pos", params.get("pos"), 0, POSITION_MAX)
    if windowed or "w" in params or "l" in params:
        window = _number("w", params.get("w"), 1.0, HU_MAX)
        level = _number("l", params.get("l"), -HU_MAX, HU_MAX)
    else:
        window, level = WINDOW_PRESETS["lung"]
    overlays = params.get("ov", "1")
    if overlays not in ("0", "1"):
        raise SliceQueryError(f"ov={_shown(overlays)}: give 0 (no overlays) or 1")
    selected = params.get("sel", "")
    if selected and not _FINDING_KEY.match(selected):
        raise SliceQueryError(f"sel={_shown(selected)}: give a finding key such as ai-1")
    pt = params.get("pt", "-1,0,0").split(",")
    if len(pt) != 3:
        raise SliceQueryError("pt: give slice,row,column (slice -1: no marked point)")
    k = integer_parameter("pt slice", pt[0], -1, POSITION_MAX)
    row = _number("pt row", pt[1], -PIXEL_MAX, PIXEL_MAX)
    col = _number("pt column", pt[2], -PIXEL_MAX, PIXEL_MAX)
    lang = params.get("lang", "en")
    return SliceQuery(
        review=review,
        position=position,
        window=window,
        level=level,
        overlays=overlays == "1",
        selected=selected or None,
        point=(k, row, col) if k >= 0 else None,
        lang=lang if lang in LANGUAGES else "en",
    )


def review_parameter(params: Mapping[str, str]) -> int:
    """The ``review`` query parameter, checked (SliceQueryError)."""
    return integer_parameter("review", params.get("review"), 1, REVIEW_ID_MAX)


class ViewedReviews:
    """Which reviews a user may fetch pictures of: those they opened in the viewer (that open
    is the audited study view). A cache of the audit log, shared by the picture routes."""

    def __init__(self, ctx: Any) -> None:
        self._ctx = ctx
        self._seen: set[tuple[str, int]] = set()

    def refusal(self, user: User, review: int) -> Response | None:
        """None when ``user`` has viewed ``review``; else the 403 answer. An unknown review
        raises ReviewError (404)."""
        if (user.username, review) in self._seen:
            return None
        study_uid = self._ctx.reviews.case(review).study_uid  # unknown review: ReviewError
        if not self._ctx.accounts.audit.has_viewed(user.username, study_uid):
            return Response("open the study in the viewer first", status_code=403)
        if len(self._seen) >= VIEWED_MEMORY:  # start the cache again
            self._seen.clear()
        self._seen.add((user.username, review))
        return None


def add_slice_route(api: FastAPI, ctx: Any, viewed: ViewedReviews) -> None:
    """Serve ``GET /viewer/slice.png`` (the slice as the server renders it) and
    ``GET /viewer/marks.png`` (only its marks, transparent elsewhere, for the page's own
    viewer) on ``api``, behind the session gate."""

    @api.get("/viewer/slice.png")
    def viewer_slice(request: Request) -> Response:
        return _slice_answer(request, marks_only=False)

    @api.get("/viewer/marks.png")
    def viewer_marks(request: Request) -> Response:
        return _slice_answer(request, marks_only=True)

    def _slice_answer(request: Request, marks_only: bool) -> Response:
        user: User = request.state.user
        try:
            q = parse_slice_query(request.query_params, windowed=not marks_only)
        except SliceQueryError as exc:
            return Response(str(exc), status_code=400, media_type="text/plain")
        try:
            refused = viewed.refusal(user, q.review)
            if refused is not None:
                return refused
            st = ViewerState(
                review_id=q.review,
                window=q.window,
                level=q.level,
                overlays=q.overlays,
                selected=q.selected,
                challenger=user.role in challenger.ROLES,  # an engineer's: shadow findings too
            )
            if q.point is not None:  # the marked point's cross, on its slice
                st.point = (*q.point, 0.0, 0.0, 0.0)
            view = study_view(ctx, q.review)
            st.slice_count = view.slice_count
            st.slice = view.slice_at(q.position)
            png = slice_png_bytes(ctx, st, marks_only)
            info = (
                "" if marks_only else slice_info(ctx, st, lambda key, **v: text(q.lang, key, **v))
            )
        except ReviewError as exc:
            return Response(str(exc), status_code=404)
        except ValueError as exc:  # a selected finding not in this study
            return Response(str(exc), status_code=400)
        return Response(
            png or b"",
            media_type="image/png",
            headers={
                "Cache-Control": "private, no-store",
                "X-Aidx-Slice-Position": str(view.display_position(st.slice) + 1),
                "X-Aidx-Slice-Info": quote(info),
            },
        )
