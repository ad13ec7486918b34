"""Logging set-up for every aidx command: plain text for people, JSON lines for collectors.

Log UIDs, AE titles and paths; never patient names, IDs or birth dates. Libraries do not know
that rule: pydicom and highdicom quote the values they find wrong ("Invalid value for VR DA:
'1961-02-03'", 'The string "MUSTERMANN" is unlikely to represent the intended person name'),
in log lines, in warnings and in exception messages. So every log record is redacted as it is
made (:class:`PatientDataFilter`), whichever handler receives it:

- in records of the libraries (loggers ``pydicom``, ``highdicom``, and ``py.warnings``, where
  ``logging.captureWarnings`` sends Python warnings) every quoted string is replaced by
  ``[redacted]`` unless it is a DICOM keyword, a VR or a UID, and so is the message of an
  exception raised in those libraries, wherever it is logged or recorded (:func:`exception_text`);
- in every record, the values of the current study's patient attributes (set with
  :func:`patient_values` around the work on one study) are replaced by ``[redacted]``.
"""

from __future__ import annotations

import builtins
import importlib.util
import json
import logging
import os
import re
import sys
import traceback
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

# pydicom and highdicom are not imported here: every aidx process sets up logging, most never
# read DICOM (importing both takes about 0.7 s). Their loggers are configured by name; what the
# redaction needs from pydicom is imported when a record of theirs is first redacted.

_RESERVED = set(vars(logging.makeLogRecord({})))

REDACTED = "[redacted]"
LIBRARY_LOGGERS = ("pydicom", "highdicom", "py.warnings")
_LIBRARIES = ("pydicom", "highdicom")

# A quoted string, as the libraries write them: '...', "..." or a bytes repr b'...'.
_QUOTED = re.compile(r"""b?'(?:[^'\\\n]|\\.)*'|b?"(?:[^"\\\n]|\\.)*\"""")
_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*)){3,}$")
_TAG = re.compile(r"^\(?[0-9A-Fa-f]{4},\s?[0-9A-Fa-f]{4}\)?$")
# Type names, as in "'str' object cannot be interpreted as an integer".
_BUILTINS = frozenset(n for n in dir(builtins) if isinstance(getattr(builtins, n), type))
_ARGUMENT = re.compile(r"^[a-z][a-z0-9]*(_[a-z0-9]+)+$")  # an argument: "patient_name"

# Patient attributes whose values are redacted from every record made while a study is worked
# on (the Patient module's group 0010 is taken whole).
_STUDY_PATIENT_KEYWORDS = (
    "AccessionNumber",
    "ReferringPhysicianName",
    "PhysiciansOfRecord",
    "NameOfPhysiciansReadingStudy",
    "RequestingPhysician",
    "PerformingPhysicianName",
    "OperatorsName",
    "InstitutionName",
    "InstitutionAddress",
)
_PATIENT_GROUP = 0x0010
_MIN_VALUE_LENGTH = 2  # shorter values (a sex "M") would blank every word they appear in

_PATIENT_VALUES: ContextVar[tuple[re.Pattern[str], ...]] = ContextVar(
    "aidx_patient_values", default=()
)


@cache
def _library_dirs() -> tuple[str, ...]:
    """The folders of pydicom and highdicom, found without importing them."""
    specs = [importlib.util.find_spec(name) for name in _LIBRARIES]
    return tuple(str(Path(s.origin).parent) + os.sep for s in specs if s and s.origin)


_DICOM_WORDS: frozenset[str] | None = None


def _dicom_words() -> frozenset[str]:
    """DICOM keywords and VRs: quoted, they name an attribute, not a value."""
    global _DICOM_WORDS  # noqa: PLW0603 - read from pydicom once, when first needed
    if _DICOM_WORDS is None:
        try:
            from pydicom.datadict import keyword_dict  # noqa: PLC0415 - not in every process
            from pydicom.valuerep import VR  # noqa: PLC0415
        except ImportError:  # a warning while pydicom itself is imported: redact every quote
            return frozenset()
        _DICOM_WORDS = frozenset(keyword_dict) | frozenset(vr.value for vr in VR)
    return _DICOM_WORDS


def _keep_quoted(match: re.Match[str]) -> str:
    quoted = match.group(0)
    inner = quoted[2:-1] if quoted.startswith("b") else quoted[1:-1]
    if inner == "" or inner in _dicom_words() or inner in _BUILTINS:
        return quoted
    if _ARGUMENT.match(inner):
        return quoted
    if _UID.match(inner) or _TAG.match(inner):
        return quoted
    return f"'{REDACTED}'"


def redact_quoted(text: str) -> str:
    """``text`` with every quoted string redacted that is not a DICOM keyword, VR, tag or UID:
    how pydicom and highdicom quote the values they report."""
    return _QUOTED.sub(_keep_quoted, text)


def redact_known(text: str) -> str:
    """``text`` with the current study's patient attribute values (see :func:`patient_values`)
    redacted."""
    for pattern in _PATIENT_VALUES.get():
        text = pattern.sub(REDACTED, text)
    return text


def redact(text: str, library: bool = False) -> str:
    """Both: known values always, quoted strings when ``library`` wrote the text."""
    text = redact_known(text)
    return redact_quoted(text) if library else text


def from_library(exc: BaseException) -> bool:
    """Whether ``exc``, or an exception it was raised from, was raised inside pydicom or
    highdicom (whose messages quote values)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        tb = current.__traceback__
        while tb is not None:
            if tb.tb_frame.f_code.co_filename.startswith(_library_dirs()):
                return True
            tb = tb.tb_next
        current = current.__cause__ or current.__context__
    return False


def exception_text(exc: BaseException) -> str:
    """``Type: message`` of an exception, safe to log or to record (a job's failure reason):
    patient values redacted, and quoted values too when a library raised it."""
    return f"{type(exc).__name__}: {redact(str(exc), from_library(exc))}"


def _traceback_text(exc: BaseException) -> str:
    """The traceback as ``logging`` formats it, with the exception messages redacted (frame
    lines name files and code, not values, and are kept)."""
    library = from_library(exc)
    chunks = traceback.format_exception(type(exc), exc, exc.__traceback__)
    text = "".join(
        chunk if chunk.startswith("  File ") else redact(chunk, library) for chunk in chunks
    )
    return text.rstrip("\n")


class PatientDataFilter(logging.Filter):
    """Redacts patient data from a record (in place; it never drops one). Applied to every
    record as it is made (:func:`protect_patient_data`) and by aidx's handler."""

    def filter(self, record: logging.LogRecord) -> bool:
        library = (record.name or "").startswith(LIBRARY_LOGGERS)
        args = record.args
        has_exception_arg = isinstance(args, tuple) and any(
            isinstance(a, BaseException) for a in args
        )
        if library or has_exception_arg or _PATIENT_VALUES.get():
            if isinstance(args, tuple) and has_exception_arg:
                record.args = tuple(
                    _safe_arg(a) if isinstance(a, BaseException) else a for a in args
                )
            try:
                message = record.getMessage()
            except (TypeError, ValueError):  # a bad format string: logging reports it later
                return True
            record.msg = redact(message, library)
            record.args = ()
        if record.exc_info and record.exc_info[1] is not None and not record.exc_text:
            record.exc_text = _traceback_text(record.exc_info[1])
        return True


def _safe_arg(exc: BaseException) -> str:
    return redact(str(exc), from_library(exc))


_FILTER = PatientDataFilter()
_HIDDEN_WARNINGS = (
    # highdicom.valuerep.check_person_name, at every result written for a name of one
    # component (valid DICOM: a family name alone); the message quotes the name.
    r"The string .* is unlikely to represent the intended person name",
    # pydicom's warn_and_log: the same text also goes to the "pydicom" logger, redacted there.
    r"Invalid value for VR ",
)


def _wrap_factory(previous: Callable[..., logging.LogRecord]) -> Callable[..., logging.LogRecord]:
    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        _FILTER.filter(record)
        return record

    factory._aidx_redacts = True  # type: ignore[attr-defined]
    return factory


def protect_patient_data() -> None:
    """Redact patient data from every log record of this process, and send Python warnings
    (redacted) to the log instead of stderr. Idempotent; :func:`setup_logging` calls it."""
    current = logging.getLogRecordFactory()
    if not getattr(current, "_aidx_redacts", False):
        logging.setLogRecordFactory(_wrap_factory(current))
    if getattr(warnings.showwarning, "__module__", None) != logging.__name__:
        logging.captureWarnings(False)  # forget a capture that a warnings context undid
        logging.captureWarnings(True)
    for message in _HIDDEN_WARNINGS:
        # Called again, filterwarnings moves the filter to the front rather than adding one.
        warnings.filterwarnings("ignore", message=message, category=UserWarning)


def patient_values_of(dataset: Dataset) -> set[str]:
    """The values of ``dataset``'s patient attributes (the Patient module's group 0010, the
    accession number and the people named in the study), and the components of its names, as
    strings that messages may quote."""
    from pydicom.datadict import keyword_dict  # noqa: PLC0415 - not for every aidx process
    from pydicom.multival import MultiValue  # noqa: PLC0415
    from pydicom.valuerep import PersonName  # noqa: PLC0415

    values: set[str] = set()
    # keys(), not the dataset: iterating a Dataset converts every element.
    tags: list[int] = [t for t in dataset.keys() if t.group == _PATIENT_GROUP]  # noqa: SIM118
    tags += [keyword_dict[k] for k in _STUDY_PATIENT_KEYWORDS if k in dataset]
    for tag in tags:
        try:
            element = dataset[tag]
        except (KeyError, ValueError, TypeError):  # an element pydicom cannot convert
            continue
        if element.VR == "SQ" or element.value is None:
            continue
        items = element.value if isinstance(element.value, MultiValue) else [element.value]
        for item in items:
            if isinstance(item, bytes):
                continue
            values.add(str(item).strip())
            if isinstance(item, PersonName):
                values.update(str(part).strip() for part in item.components)
                values.update(
                    part.strip() for part in str(item).replace("=", "^").split("^") if part
                )
    return {v for v in values if len(v) >= _MIN_VALUE_LENGTH}


def _value_pattern(value: str) -> re.Pattern[str]:
    # Not inside a longer word (an underscore separates: "NAME_1961"), and a number not
    # inside a longer number or a UID ("1.2.19610203.1"; a full stop after it is fine).
    if re.fullmatch(r"[\d.\-/: ]+", value):
        before, after = r"(?<![^\W_])(?<!\d\.)", r"(?![^\W_]|\.\d)"
    else:
        before, after = r"(?<![^\W_])", r"(?![^\W_])"
    return re.compile(before + re.escape(value) + after)


@contextmanager
def patient_values(values: Iterable[str]) -> Iterator[None]:
    """Redact ``values`` from every log record made in this context (this thread or task):
    around the work on one study, with :func:`patient_values_of` its patient's values."""
    patterns = tuple(_value_pattern(v) for v in sorted(set(values), key=len, reverse=True) if v)
    token = _PATIENT_VALUES.set(_PATIENT_VALUES.get() + patterns)
    try:
        yield
    finally:
        _PATIENT_VALUES.reset(token)


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with any ``extra=`` fields as keys."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RESERVED and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = record.exc_text or self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


class _RequestorConnectFailures(logging.Filter):
    """pynetdicom logs two ERROR lines ("Association request failed", "TCP Initialisation
    Error") whenever a connection it requests fails. aidx's requestors (the outbox, ``aidx
    send``/``echo``) report that failure themselves, with the destination and what happens
    next, so these lines are dropped unless pynetdicom is logged at DEBUG."""

    PREFIXES = ("Association request failed", "TCP Initialisation Error")

    def filter(self, record: logging.LogRecord) -> bool:
        if logging.getLogger("pynetdicom").isEnabledFor(logging.DEBUG):
            return True
        return not str(record.msg).startswith(self.PREFIXES)


class _CutShortPdus(logging.Filter):
    """pynetdicom logs an ERROR line (and, for a socket error, a traceback) when a connection
    closes in the middle of a PDU, naming no peer. The node reports each such connection itself,
    once, with the peer address and the reason (its deadline, a limit, or the peer hanging up:
    ``dicom_node.guard`` and ``dicom_node.limits``), so these are dropped unless pynetdicom is
    logged at DEBUG."""

    PREFIXES = (
        "The received PDU is shorter than expected",
        "Connection closed before the entire PDU was received",
    )

    def filter(self, record: logging.LogRecord) -> bool:
        if logging.getLogger("pynetdicom").isEnabledFor(logging.DEBUG):
            return True
        if isinstance(record.msg, OSError):  # LOGGER.exception(exc) after a failed read
            return False
        return not str(record.msg).startswith(self.PREFIXES)


_CONNECT_FAILURES = _RequestorConnectFailures()
_CUT_SHORT = _CutShortPdus()


def setup_logging(level: str = "INFO", fmt: str = "text") -> None:
    """Configure the root logger once per process (later calls replace the handler)."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    handler.addFilter(_FILTER)
    protect_patient_data()
    root.addHandler(handler)
    root.setLevel(level)
    # pynetdicom logs every DIMSE message at INFO: hundreds of lines per study, and slow.
    logging.getLogger("pynetdicom").setLevel("DEBUG" if level == "DEBUG" else "WARNING")
    transport = logging.getLogger("pynetdicom.transport")
    if _CONNECT_FAILURES not in transport.filters:
        transport.addFilter(_CONNECT_FAILURES)
    dul = logging.getLogger("pynetdicom.dul")
    if _CUT_SHORT not in dul.filters:
        dul.addFilter(_CUT_SHORT)
    logging.getLogger("highdicom").setLevel("DEBUG" if level == "DEBUG" else "WARNING")
