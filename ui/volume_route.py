"""What the page's own viewer (ui/viewer.js) reads: ``GET /viewer/study.json`` (the series'
geometry, the corner-overlay text, the findings) and ``GET /viewer/pixels`` (one axial slice, or
one coronal or sagittal reformat, as lossless little-endian int16 HU, uncompressed), so that the
browser windows, zooms and reformats without a server round trip per change, as cornerstone does.

Both only for a review the user has opened in the viewer (ui.slice_route.ViewedReviews), with
every parameter checked (a bad one is a 400 naming it), never cached by the browser.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from typing import Any, Final
from weakref import WeakKeyDictionary

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from numpy.typing import NDArray
from pydicom.errors import InvalidDicomError

from aidx.deflate import InflateLimitError, read_header
from inference.volume import frame_attribute
from ui import challenger
from ui.accounts import User
from ui.review import ReviewError
from ui.slice_route import SliceQueryError, ViewedReviews, integer_parameter, review_parameter
from ui.viewer import MAX_INFLATED_BYTES, StudyView
from ui.viewer_session import (
    ADDED_COLOUR,
    dicom_date,
    finding_slice,
    image_label,
    person_name,
    study_view,
)

log = logging.getLogger("aidx.ui.volume_route")

PLANES: Final = ("axial", "coronal", "sagittal")
NO_STORE: Final = {"Cache-Control": "private, no-store"}
_SERIES_MEMORY: Final = 64  # series headers kept (number, description, thickness)
_series_headers: OrderedDict[str, dict[str, str]] = OrderedDict()
_series_lock = threading.Lock()
_static: WeakKeyDictionary[StudyView, dict[str, Any]] = WeakKeyDictionary()
_static_lock = threading.Lock()


def _hex(colour: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*colour)


def series_header(view: StudyView) -> dict[str, str]:
    """Series Number, Series Description and Slice Thickness as the first file holds them
    (empty strings where it holds none or cannot be read)."""
    uid = view.volume.series_uid
    with _series_lock:
        if uid in _series_headers:
            return _series_headers[uid]
    values = {"number": "", "description": "", "thickness": ""}
    if view.volume.files:
        try:
            ds = read_header(
                view.volume.files[0],
                MAX_INFLATED_BYTES,
                specific_tags=[
                    "SeriesNumber",
                    "SeriesDescription",
                    "SliceThickness",
                    "SharedFunctionalGroupsSequence",  # an Enhanced CT's thickness is in there
                ],
            )
            thickness = ds.get("SliceThickness") or frame_attribute(
                ds, 1, "PixelMeasuresSequence", "SliceThickness"
            )
            values = {
                "number": str(ds.get("SeriesNumber", "") or ""),
                "description": str(ds.get("SeriesDescription", "") or ""),
                "thickness": str(thickness or ""),
            }
        except (OSError, InvalidDicomError, InflateLimitError, ValueError) as exc:
            log.warning("series header unreadable: series_uid=%s %s", uid, exc)
    with _series_lock:
        _series_headers[uid] = values
        while len(_series_headers) > _SERIES_MEMORY:
            _series_headers.popitem(last=False)
    return values


def _series_description(view: StudyView) -> dict[str, Any]:
    """What study.json says of the series itself (worked out once per opened view)."""
    with _static_lock:
        known = _static.get(view)
    if known is not None:
        return known
    count = view.slice_count
    rows, cols = view.shape
    spacing = view.volume.spacing
    slices = range(count)
    known = {
        "forward": count < 2 or view.display_position(0) == 0,
        "rows": rows,
        "cols": cols,
        "count": count,
        "spacing": {"slice": spacing[0], "row": spacing[1], "col": spacing[2]},
        "series": series_header(view),
        "images": [image_label(view, view.slice_at(p)) for p in slices],
        "locations": [round(view.slice_location(view.slice_at(p)), 2) for p in slices],
        "ai_marked": {view.display_position(k) for k in slices if view.findings_on_slice(k)},
    }
    with _static_lock:
        _static[view] = known
    return known


def study_description(ctx: Any, review: int, with_challenger: bool = False) -> dict[str, Any]:
    """The viewer's description of review ``review``'s series (study.json); with a shadow
    challenger's findings too (``challenger-<id>``, an engineer's view: ui.challenger)."""
    view = study_view(ctx, review)
    static = _series_description(view)
    count, forward = static["count"], static["forward"]
    who = ctx.reviews.identification(review)
    reviewed = ctx.reviews.findings(review)
    findings = []
    for f in reviewed:
        k, r, c = view.patient_to_pixel(f.center_mm)
        if f.ai is not None:
            k = float(finding_slice(view, f))
        colour = view.colour(f.ai.id) if f.ai is not None else ADDED_COLOUR
        findings.append(
            {
                "key": f.key,
                "colour": _hex(colour),
                "pos": k if forward else count - 1 - k,
                "row": r,
                "col": c,
                "diameter_mm": round(float(f.diameter_mm), 1),
                "status": f.status,
            }
        )
    circles = [
        (f.center_mm, f.diameter_mm)
        for f in reviewed
        if f.source == "added" and f.status != "removed"
    ]
    if with_challenger:
        shadow = challenger.challenger_findings(ctx.reviews._store, ctx.reviews.case(review))
        for _, found in shadow:
            k, r, col = view.patient_to_pixel(found.center_mm)
            findings.append(
                {
                    "key": f"{challenger.PREFIX}{found.id}",
                    "colour": _hex(challenger.COLOUR),
                    "pos": k if forward else count - 1 - k,
                    "row": r,
                    "col": col,
                    "diameter_mm": round(float(found.diameter_mm), 1),
                    "status": "shadow",
                }
            )
            circles.append((found.center_mm, found.diameter_mm))
    return {
        "review": review,
        "forward": forward,  # scroll position p is volume index p (else count - 1 - p)
        **{k: v for k, v in static.items() if k not in ("forward", "ai_marked")},
        "marked": sorted(static["ai_marked"] | _circle_marks(view, circles)),
        "patient": {
            "name": person_name(who.patient_name),
            "id": who.patient_id,
            "born": dicom_date(who.birth_date),
            "sex": who.sex,
        },
        "study": {
            "accession": who.accession_number,
            "date": dicom_date(who.study_date),
            "description": who.description,
        },
        "findings": findings,
    }


def _circle_marks(view: StudyView, circles: list[tuple[Any, float]]) -> set[int]:
    """Scroll positions a circle (an added finding's, a challenger's: centre in mm, diameter)
    is drawn on (the page fetches marks only for marked positions: these and those of the AI
    findings' contours and boxes)."""
    marked: set[int] = set()
    for center_mm, diameter_mm in circles:
        k, _, _ = view.patient_to_pixel(center_mm)
        reach = diameter_mm / 2 / view.volume.spacing[0]
        for slice_index in range(int(np.floor(k - reach)), int(np.ceil(k + reach)) + 1):
            if 0 <= slice_index < view.slice_count:
                marked.add(view.display_position(slice_index))
    return marked


def plane_pixels(view: StudyView, plane: str, index: int) -> tuple[NDArray[np.int16], int, int]:
    """One picture of the series as int16 HU: ``axial`` the slice at scroll position
    ``index``; ``coronal`` row ``index`` and ``sagittal`` column ``index`` of every slice, top
    to bottom in scroll order. Returns (pixels, height, width). Raises SliceQueryError for an
    index outside the series."""
    count = view.slice_count
    rows, cols = view.shape
    limit = {"axial": count, "coronal": rows, "sagittal": cols}[plane]
    if not 0 <= index < limit:
        raise SliceQueryError(f"index={index} is out of range for {plane}: 0..{limit - 1}")
    hu = view.volume.hu
    if plane == "axial":
        picture = hu[view.slice_at(index)]
    else:
        order = np.fromiter((view.slice_at(p) for p in range(count)), dtype=np.intp, count=count)
        picture = hu[order, index, :] if plane == "coronal" else hu[order, :, index]
    out = np.clip(np.rint(picture), -32768, 32767).astype("<i2")
    return out, int(out.shape[0]), int(out.shape[1])


def add_volume_routes(api: FastAPI, ctx: Any, viewed: ViewedReviews) -> None:
    """Serve ``/viewer/study.json`` and ``/viewer/pixels`` on ``api`` (behind the gate)."""

    @api.get("/viewer/study.json")
    def viewer_study(request: Request) -> Response:
        user: User = request.state.user
        try:
            review = review_parameter(request.query_params)
            refused = viewed.refusal(user, review)
            if refused is not None:
                return refused
            described = study_description(ctx, review, user.role in challenger.ROLES)
            return JSONResponse(described, headers=NO_STORE)
        except SliceQueryError as exc:
            return Response(str(exc), status_code=400, media_type="text/plain")
        except ReviewError as exc:
            return Response(str(exc), status_code=404, media_type="text/plain")

    @api.get("/viewer/pixels")
    def viewer_pixels(request: Request) -> Response:
        user: User = request.state.user
        params = request.query_params
        try:
            review = review_parameter(params)
            plane = params.get("plane", "axial")
            if plane not in PLANES:
                raise SliceQueryError(f"plane={plane[:20]!r}: give one of {', '.join(PLANES)}")
            index = integer_parameter("index", params.get("index"), 0, 2**31 - 1)
            refused = viewed.refusal(user, review)
            if refused is not None:
                return refused
            pixels, height, width = plane_pixels(study_view(ctx, review), plane, index)
        except SliceQueryError as exc:
            return Response(str(exc), status_code=400, media_type="text/plain")
        except ReviewError as exc:
            return Response(str(exc), status_code=404, media_type="text/plain")
        # Uncompressed: gzip (level 1) halves a CT slice but costs 12 ms of CPU per 512² slice
        # on a 2-core server, three times what the bytes take on a gigabit LAN, and scrolling
        # waits on the server's CPU. A reverse proxy may compress for remote reading.
        headers = {**NO_STORE, "X-Aidx-Height": str(height), "X-Aidx-Width": str(width)}
        return Response(pixels.tobytes(), media_type="application/octet-stream", headers=headers)
