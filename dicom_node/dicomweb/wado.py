"""WADO-RS (PS3.18 10.4): instances, series and studies as ``multipart/related;
type="application/dicom"`` of the files as stored, their metadata as DICOM JSON, and frames.

- Files go out as stored, in the transfer syntax they came in (files are never transcoded): a
  request whose Accept names a transfer syntax that a file is not in gets 406, with the stored
  syntaxes named; ``transfer-syntax=*``, or none, takes them as stored.
- Metadata is each file's header as DICOM JSON (PS3.18 F.2) without the pixel data (the frames
  resource returns it) and with the stored transfer syntax as AvailableTransferSyntaxUID; other
  binary values are inline (InlineBinary).
- Frames: native (uncompressed little endian) pixel data as ``application/octet-stream`` (a
  1-bit frame, as in a binary SEG, from bit 0 of its first byte), and
  encapsulated pixel data frame by frame in its own media type (``image/jpeg``, ``image/jls``,
  ``image/jp2``; RLE as ``application/octet-stream``) with its transfer syntax.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmread
from pydicom.encaps import generate_frames
from pydicom.uid import UID

from .catalog import Entry
from .multipart import MediaType

CHUNK = 1024 * 1024
DICOM = "application/dicom"
OCTETS = "application/octet-stream"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
# The media type of a frame in each encapsulated transfer syntax (PS3.18 Table 8.7.3-2).
FRAME_TYPES = {
    "1.2.840.10008.1.2.4.50": "image/jpeg",
    "1.2.840.10008.1.2.4.51": "image/jpeg",
    "1.2.840.10008.1.2.4.57": "image/jpeg",
    "1.2.840.10008.1.2.4.70": "image/jpeg",
    "1.2.840.10008.1.2.4.80": "image/jls",
    "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2",
    "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.5": OCTETS,
}


class NotAcceptableError(ValueError):
    """What the client accepts is not what aidx has (406, with this message)."""


class FrameError(ValueError):
    """Frames that the instance does not have (404) or cannot give (406)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def check_accept(accept: list[MediaType], entries: list[Entry]) -> None:
    """Raise NotAcceptableError unless some accepted type takes every file as stored."""
    if not accept:
        return
    stored = sorted({e.transfer_syntax for e in entries})
    for media in accept:
        if media.type in ("*/*", "multipart/*"):
            return
        if media.type != "multipart/related":
            continue
        part_type = media.params.get("type", DICOM).lower()
        syntax = media.params.get("transfer-syntax", "*")
        if part_type in (DICOM, "*/*") and (syntax == "*" or stored == [syntax]):
            return
    raise NotAcceptableError(
        'aidx returns the files as stored: accept multipart/related; type="application/dicom"'
        f"; transfer-syntax=* (the files are in {', '.join(stored) or 'no syntax'})"
    )


def file_chunks(path: str) -> Iterator[bytes]:
    with Path(path).open("rb") as handle:
        while chunk := handle.read(CHUNK):
            yield chunk


def metadata(entry: Entry) -> dict[str, Any]:
    """The instance's DICOM JSON without bulk pixel data."""
    ds = dcmread(entry.path, stop_before_pixels=True)
    ds.AvailableTransferSyntaxUID = entry.transfer_syntax
    # Far above any header value: every binary value is inline, none needs a bulk data URI.
    return ds.to_json_dict(bulk_data_threshold=1 << 30, suppress_invalid_tags=True)


@dataclass(frozen=True)
class Frame:
    content_type: str
    data: bytes


def frames(entry: Entry, numbers: list[int]) -> list[Frame]:
    """The frames ``numbers`` (1-based) of the instance's pixel data."""
    ds = dcmread(entry.path)
    if "PixelData" not in ds:
        raise FrameError(404, f"instance {entry.sop_uid} has no pixel data")
    count = int(ds.get("NumberOfFrames", 1) or 1)
    bad = [n for n in numbers if not 1 <= n <= count]
    if bad:
        raise FrameError(404, f"instance {entry.sop_uid} has frames 1 to {count}, not {bad[0]}")
    syntax = UID(entry.transfer_syntax)
    if syntax.is_encapsulated:
        media = FRAME_TYPES.get(str(syntax))
        if media is None:
            raise FrameError(406, f"frames in transfer syntax {syntax} are not served")
        content_type = f"{media}; transfer-syntax={syntax}"
        all_frames = list(generate_frames(ds.PixelData, number_of_frames=count))
        return [Frame(content_type, all_frames[n - 1]) for n in numbers]
    if not syntax.is_little_endian:
        raise FrameError(406, f"frames of big endian pixel data ({syntax}) are not served")
    content_type = f"{OCTETS}; transfer-syntax={EXPLICIT_LE}"
    samples = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1))
    data = ds.PixelData
    if int(ds.BitsAllocated) == 1:
        # A binary SEG's frames follow each other bit by bit; each goes out from bit 0 of its
        # own first byte (what viewers' SEG loaders read).
        bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")
        return [
            Frame(
                content_type,
                np.packbits(bits[(n - 1) * samples : n * samples], bitorder="little").tobytes(),
            )
            for n in numbers
        ]
    size = samples * int(ds.BitsAllocated) // 8
    return [Frame(content_type, bytes(data[(n - 1) * size : n * size])) for n in numbers]
