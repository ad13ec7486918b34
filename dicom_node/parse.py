"""What the receive path reads of a C-STORE data set, without decoding pixel data.

The data set arrives as bytes in the negotiated transfer syntax. We check that it is complete
(pydicom reads short values without complaint), take the attributes the index needs, and build
the Part 10 file (preamble, File Meta Information, data set exactly as received).
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from io import BytesIO
from typing import Any, BinaryIO, cast

from pydicom import dcmread
from pydicom.charset import convert_encodings, decode_bytes
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_dataset
from pydicom.sequence import Sequence
from pydicom.uid import UID
from pydicom.valuerep import TEXT_VR_DELIMS, PersonName

from aidx.deflate import DEFLATED_SYNTAXES, InflateLimitError, inflate
from aidx.store.store import InstanceRecord

from . import status
from .spool import valid_uid

IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.8.498.1.1.20261128"
IMPLEMENTATION_VERSION = "AIDX_0_1"
UNDEFINED_LENGTH = 0xFFFFFFFF
PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
REQUIRED_UIDS = ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID")
INDEXED = (
    "SpecificCharacterSet",
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "PatientID",
    "IssuerOfPatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyDate",
    "StudyTime",
    "StudyDescription",
    "Modality",
    "SeriesDescription",
    "BodyPartExamined",
    "SeriesNumber",
    "InstanceNumber",
)


class InstanceError(ValueError):
    """A received data set that cannot be stored; ``code`` is the DIMSE status to return."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code


@dataclass(frozen=True)
class Received:
    """A parsed C-STORE data set."""

    record: InstanceRecord
    dataset_bytes: bytes


def file_meta_bytes(sop_class_uid: str, sop_uid: str, transfer_syntax: str) -> bytes:
    """Preamble, "DICM" and File Meta Information (PS3.10 7.1), explicit VR little endian."""
    elements = b"".join(
        (
            _element(0x0001, b"OB", b"\x00\x01"),
            _element(0x0002, b"UI", _uid(sop_class_uid)),
            _element(0x0003, b"UI", _uid(sop_uid)),
            _element(0x0010, b"UI", _uid(transfer_syntax)),
            _element(0x0012, b"UI", _uid(IMPLEMENTATION_CLASS_UID)),
            _element(0x0013, b"SH", _even(IMPLEMENTATION_VERSION.encode("ascii"), b" ")),
        )
    )
    group_length = _element(0x0000, b"UL", struct.pack("<I", len(elements)))
    return b"\x00" * 128 + b"DICM" + group_length + elements


def _uid(value: str) -> bytes:
    return _even(value.encode("ascii"), b"\x00")


def _even(value: bytes, pad: bytes) -> bytes:
    return value + pad if len(value) % 2 else value


def _element(element: int, vr: bytes, value: bytes) -> bytes:
    if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT"):
        return struct.pack("<HH2sHI", 0x0002, element, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


@dataclass(frozen=True)
class ParseLimits:
    """What the node accepts of one data set: its size (also as inflated) and the depth of its
    nested sequences."""

    max_dataset_bytes: int = 512 * 1024 * 1024
    max_sequence_depth: int = 32


# Values longer than this are not read into memory on the receive path: their position is
# checked against the data set's end, and they stay in the file as received.
DEFER_BYTES = 64 * 1024


def parse_dataset(
    dataset_bytes: bytes | memoryview, transfer_syntax: str, limits: ParseLimits | None = None
) -> Dataset:
    """Read a data set in ``transfer_syntax`` (values stay raw until used; large ones, such as
    pixel data, are not read) and check that it is complete and within ``limits``."""
    limits = limits or ParseLimits()
    syntax = UID(transfer_syntax)
    stream: bytes | bytearray | memoryview = dataset_bytes
    try:
        if syntax in DEFLATED_SYNTAXES:
            stream = inflate(dataset_bytes, limits.max_dataset_bytes)
        reader = _ViewReader(stream)
        ds = read_dataset(
            cast(BinaryIO, reader),
            is_implicit_VR=syntax.is_implicit_VR,
            is_little_endian=syntax.is_little_endian,
            defer_size=DEFER_BYTES,
        )
        # Where pydicom reads a deferred value from if one is used (a long sequence).
        ds.filename, ds.buffer, ds.timestamp, ds.fileobj_type = None, reader, None, open
        check_complete(ds, len(stream))
        check_depth(ds, limits.max_sequence_depth)
    except InflateLimitError as exc:
        raise InstanceError(
            status.OUT_OF_RESOURCES,
            f"{exc} (node.max_dataset_mb); nothing was stored",
        ) from exc
    except RecursionError as exc:
        raise InstanceError(
            status.CANNOT_UNDERSTAND,
            f"sequences nested deeper than node.max_sequence_depth ({limits.max_sequence_depth})",
        ) from exc
    except (
        zlib.error,
        struct.error,  # an element header cut short
        EOFError,
        ValueError,
        TypeError,
        KeyError,
        OSError,
        NotImplementedError,
    ) as exc:
        if isinstance(exc, InstanceError):
            raise
        raise InstanceError(status.CANNOT_UNDERSTAND, f"cannot parse the data set: {exc}") from exc
    return ds


class _ViewReader:
    """A read-only file over a buffer, without copying it (BytesIO would)."""

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        self._view = memoryview(data)
        self._pos = 0

    def read(self, size: int = -1) -> bytes:
        end = (
            len(self._view) if size is None or size < 0 else min(self._pos + size, len(self._view))
        )
        chunk = bytes(self._view[self._pos : end])
        self._pos = max(end, self._pos)
        return chunk

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: len(self._view)}[whence]
        self._pos = max(base + offset, 0)
        return self._pos


def check_depth(ds: Dataset, max_depth: int, depth: int = 1) -> None:
    """Refuse sequences nested deeper than ``max_depth`` (each level is converted only when the
    one above it is within the limit)."""
    for tag in ds.keys():  # noqa: SIM118 - iterating a Dataset would convert every value
        raw: Any = ds.get_item(tag, keep_deferred=True)
        vr = getattr(raw, "VR", None)
        if vr != "SQ" and not (vr in (None, "UN") and _is_sequence_tag(tag)):
            continue
        if depth > max_depth:
            raise InstanceError(
                status.CANNOT_UNDERSTAND,
                f"sequences nested deeper than node.max_sequence_depth ({max_depth})",
            )
        value = ds[tag].value
        if isinstance(value, Sequence):
            for item in value:
                check_depth(item, max_depth, depth + 1)


def _is_sequence_tag(tag: Any) -> bool:
    try:
        return dictionary_VR(tag) == "SQ"
    except KeyError:
        return False


def check_complete(ds: Dataset, end: int | None = None) -> None:
    """Refuse a truncated data set: each top-level element must hold the bytes it declares
    (a value that was not read must lie before ``end``), and an image must have pixel data."""
    for tag in ds.keys():  # noqa: SIM118 - iterating a Dataset would convert every value
        # keep_deferred: an empty value is not converted (which fails for an unknown VR).
        raw: Any = ds.get_item(tag, keep_deferred=True)
        length = getattr(raw, "length", None)
        value = raw.value
        if value is None and length and end is not None and length != UNDEFINED_LENGTH:
            arrived = max(min(end - raw.value_tell, length), 0)  # deferred: not read
        else:
            arrived = len(value or b"")
        if length is not None and length != UNDEFINED_LENGTH and arrived < length:
            raise InstanceError(
                status.CANNOT_UNDERSTAND,
                f"truncated: element {tag} declares {length} bytes, {arrived} arrived",
            )
    if "Rows" in ds and not any(keyword in ds for keyword in PIXEL_TAGS):
        raise InstanceError(status.CANNOT_UNDERSTAND, "truncated: an image without pixel data")


def read_record(
    ds: Dataset,
    sop_uid: str,
    sop_class_uid: str,
    transfer_syntax: str,
    calling_ae: str,
    size: int,
) -> InstanceRecord:
    """Index fields of a parsed data set, after checking its UIDs against the request.

    Values are decoded straight from the raw elements (the character set applied to the text
    value representations that need it), which is several times faster than letting pydicom
    convert and validate each element, on a path that runs for every received instance.
    """
    reader = _RawReader(ds)
    uids = {}
    for keyword in REQUIRED_UIDS:
        value = reader.text(keyword)
        if not value:
            raise InstanceError(status.CANNOT_UNDERSTAND, f"{keyword} is missing")
        if not valid_uid(value):
            raise InstanceError(status.CANNOT_UNDERSTAND, f"{keyword} {value!r} is not a valid UID")
        uids[keyword] = value
    if uids["SOPInstanceUID"] != sop_uid:
        raise InstanceError(
            status.DATASET_DOES_NOT_MATCH_SOP_CLASS,
            f"SOP Instance UID in the data set ({uids['SOPInstanceUID']}) differs from the request",
        )
    if uids["SOPClassUID"] != sop_class_uid:
        raise InstanceError(
            status.DATASET_DOES_NOT_MATCH_SOP_CLASS,
            f"SOP Class UID in the data set ({uids['SOPClassUID']}) differs from the request "
            f"({sop_class_uid})",
        )
    return InstanceRecord(
        sop_uid=sop_uid,
        sop_class_uid=sop_class_uid,
        series_uid=uids["SeriesInstanceUID"],
        study_uid=uids["StudyInstanceUID"],
        transfer_syntax=transfer_syntax,
        patient_id=reader.text("PatientID"),
        issuer=reader.text("IssuerOfPatientID"),
        patient_name=reader.text("PatientName"),
        birth_date=reader.text("PatientBirthDate")[:8],
        sex=reader.text("PatientSex")[:16],
        accession_number=reader.text("AccessionNumber"),
        study_date=reader.text("StudyDate")[:8],
        study_time=reader.text("StudyTime")[:16],
        study_description=reader.text("StudyDescription")[:64],
        modality=reader.text("Modality")[:16],
        series_description=reader.text("SeriesDescription")[:64],
        body_part=reader.text("BodyPartExamined")[:16],
        series_number=_int(reader.text("SeriesNumber")),
        instance_number=_int(reader.text("InstanceNumber")),
        path="",
        size=size,
        calling_ae=calling_ae,
    )


_CHARSET_VRS = {"PN", "LO", "SH", "LT", "ST", "UT", "UC"}
_TAGS = {keyword: tag_for_keyword(keyword) for keyword in INDEXED}


class _RawReader:
    """Text of top-level elements, decoded from their raw bytes."""

    def __init__(self, ds: Dataset) -> None:
        self.ds = ds
        self._encodings: list[str] | None = None

    def _charsets(self) -> list[str]:
        if self._encodings is None:
            raw = self.text("SpecificCharacterSet", charset=False)
            terms = [t.strip() for t in raw.split("\\")] if raw else [""]
            try:
                self._encodings = convert_encodings(terms)
            except LookupError:
                self._encodings = ["iso8859"]
        return self._encodings

    def text(self, keyword: str, charset: bool = True) -> str:
        tag = _TAGS[keyword]
        if tag is None or tag not in self.ds:
            return ""
        element: Any = self.ds.get_item(tag, keep_deferred=True)
        value = getattr(element, "value", None)
        if value is None:
            return ""
        if not isinstance(value, bytes | bytearray):
            return str(value).strip()  # already converted by pydicom
        vr = element.VR or dictionary_VR(tag)
        try:
            if charset and vr == "PN":
                text = str(PersonName(bytes(value), self._charsets()))
            elif charset and vr in _CHARSET_VRS:
                text = decode_bytes(bytes(value), self._charsets(), TEXT_VR_DELIMS)
            else:
                text = bytes(value).decode("ascii", errors="replace")
        except (LookupError, ValueError):
            text = bytes(value).decode("latin-1", errors="replace")
        return text.strip(" \x00")


def read_file(data: bytes, calling_ae: str) -> InstanceRecord:
    """The index record of a whole Part 10 file (used when re-indexing the spool)."""
    try:
        ds = dcmread(BytesIO(data))
    except (InvalidDicomError, EOFError, ValueError, OSError) as exc:
        raise InstanceError(status.CANNOT_UNDERSTAND, f"cannot parse the file: {exc}") from exc
    check_complete(ds)
    meta = ds.file_meta
    return read_record(
        ds,
        str(meta.MediaStorageSOPInstanceUID),
        str(meta.MediaStorageSOPClassUID),
        str(meta.TransferSyntaxUID),
        calling_ae,
        len(data),
    )


def _int(text: str) -> int | None:
    try:
        return int(text) if text else None
    except ValueError:
        return None
