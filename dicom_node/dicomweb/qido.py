"""QIDO-RS (PS3.18 10.6): search for studies, series and instances.

Each level has the attributes the index (and a result object's header) knows; a query
parameter naming one of them filters by it with the matching of PS3.4 C.2.2.2: a list of UIDs
(comma or backslash between), a date or time range (``a-b``, ``-b``, ``a-``), ``*`` and ``?``
wildcards (Person Names without regard to case), else the exact value; an empty value matches
anything. A parameter naming another attribute is ignored and said so in a ``Warning`` header,
as PS3.18 asks. ``includefield`` adds attributes (keywords or tags, or ``all``); one the level
does not know is read from an instance's header (the study's or series' first instance).
``limit`` and ``offset`` page through the matches.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pydicom import dcmread
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from .catalog import Entry, SeriesSummary

MAX_RESULTS = 10_000  # without a limit, at most this many (a Warning says so)
CHARSET = "ISO_IR 192"  # the answers are UTF-8

STUDY_KEYS = (
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "StudyDescription",
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "ReferringPhysicianName",
    "StudyID",
    "ModalitiesInStudy",
    "NumberOfStudyRelatedSeries",
    "NumberOfStudyRelatedInstances",
)
SERIES_KEYS = (
    "SeriesInstanceUID",
    "Modality",
    "SeriesNumber",
    "SeriesDescription",
    "BodyPartExamined",
    "NumberOfSeriesRelatedInstances",
)
# Study attributes that come from the study's series (aidx's results included), not its row.
FROM_SERIES = {"ModalitiesInStudy", "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances"}
INSTANCE_KEYS = ("SOPInstanceUID", "SOPClassUID", "InstanceNumber", "AvailableTransferSyntaxUID")
CONTROL = {"limit", "offset", "includefield", "fuzzymatching"}


class QueryError(ValueError):
    """A query the service cannot run (400, with this message)."""


@dataclass
class Query:
    """The parsed query parameters of one search."""

    filters: dict[str, str] = field(default_factory=dict)
    include: set[str] = field(default_factory=set)
    include_all: bool = False
    limit: int | None = None
    offset: int = 0
    ignored: list[str] = field(default_factory=list)

    @classmethod
    def parse(cls, params: list[tuple[str, str]], known: tuple[str, ...]) -> Query:
        query = cls()
        for name, value in params:
            if name == "limit":
                query.limit = _count(name, value)
            elif name == "offset":
                query.offset = _count(name, value)
            elif name == "includefield":
                for item in re.split(r"[,\s]+", value.strip()):
                    if item == "all":
                        query.include_all = True
                    elif item:
                        query.include.add(_keyword(item))
            elif name == "fuzzymatching":
                if value.lower() not in ("true", "false"):
                    raise QueryError("fuzzymatching is true or false")
            else:
                keyword = _keyword(name)
                if keyword in known:
                    query.filters[keyword] = value
                else:
                    query.ignored.append(keyword)
        return query


def _count(name: str, value: str) -> int:
    if not value.isdigit():
        raise QueryError(f"{name} must be a whole number >= 0, got {value!r}")
    return int(value)


def _keyword(name: str) -> str:
    """A DICOM keyword from a query parameter's name (a keyword or 8 hex digits)."""
    if re.fullmatch(r"[0-9A-Fa-f]{8}", name):
        keyword = keyword_for_tag(Tag(int(name, 16)))
        if keyword:
            return str(keyword)
        raise QueryError(f"{name}: a tag aidx does not know (private tags cannot be searched)")
    if "." in name:
        raise QueryError(f"{name}: sequence attributes cannot be searched")
    if tag_for_keyword(name) is None:
        raise QueryError(f"{name} is neither a DICOM keyword nor a tag (e.g. PatientID, 00100020)")
    return name


def matches(value: Any, pattern: str, keyword: str) -> bool:
    """PS3.4 C.2.2.2 matching of one attribute value against a query value."""
    if pattern == "":
        return True
    values = [str(v) for v in value] if isinstance(value, list | tuple) else [str(value or "")]
    vr = dictionary_VR(keyword)
    if vr == "UI":
        wanted = {u.strip() for u in re.split(r"[,\\]", pattern) if u.strip()}
        return any(v in wanted for v in values)
    if vr in ("DA", "TM", "DT") and "-" in pattern:
        low, _, high = pattern.partition("-")
        return any(
            v and (not low or v[: len(low)] >= low) and (not high or v[: len(high)] <= high)
            for v in values
        )
    if "*" in pattern or "?" in pattern:
        regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
        flags = re.IGNORECASE if vr == "PN" else 0
        return any(re.fullmatch(regex, v, flags) for v in values)
    if vr == "PN":
        return any(v.lower() == pattern.lower() for v in values)
    return any(v == pattern for v in values)


def study_attributes(
    row: Mapping[str, Any], series_list: list[SeriesSummary] | None
) -> dict[str, Any]:
    """A study's attributes from its index row, and from its series (all of them, results
    included) when given; without them, those in :data:`FROM_SERIES` are left out."""
    attributes: dict[str, Any] = {
        "StudyInstanceUID": row["study_uid"],
        "StudyDate": row["study_date"] or "",
        "StudyTime": row["study_time"] or "",
        "AccessionNumber": row["accession_number"] or "",
        "StudyDescription": row["description"] or "",
        "PatientName": row["patient_name"] or "",
        "PatientID": row["patient_id"] or "",
        "IssuerOfPatientID": row["issuer"] or "",
        "PatientBirthDate": row["birth_date"] or "",
        "PatientSex": row["sex"] or "",
        "ReferringPhysicianName": "",
        "StudyID": "",
    }
    if series_list is not None:
        attributes["ModalitiesInStudy"] = sorted({s.modality for s in series_list if s.modality})
        attributes["NumberOfStudyRelatedSeries"] = len(series_list)
        attributes["NumberOfStudyRelatedInstances"] = sum(s.instance_count for s in series_list)
    return attributes


def row_matches(attributes: Mapping[str, Any], query: Query) -> bool:
    """Whether a study's index row passes the filters it can answer (those not from its
    series), so that only the studies that can match have their series read."""
    return all(
        matches(attributes.get(k), v, k)
        for k, v in query.filters.items()
        if k in attributes and k not in FROM_SERIES
    )


def series_attributes(summary: SeriesSummary) -> dict[str, Any]:
    return {
        "SeriesInstanceUID": summary.series_uid,
        "Modality": summary.modality,
        "SeriesNumber": summary.series_number,
        "SeriesDescription": summary.description,
        "BodyPartExamined": summary.body_part,
        "NumberOfSeriesRelatedInstances": summary.instance_count,
    }


def instance_attributes(entry: Entry) -> dict[str, Any]:
    return {
        "SOPInstanceUID": entry.sop_uid,
        "SOPClassUID": entry.sop_class_uid,
        "InstanceNumber": entry.instance_number,
        "AvailableTransferSyntaxUID": entry.transfer_syntax,
    }


@dataclass
class Match:
    """One answer: its attributes, where to retrieve it, and a file to read more from."""

    attributes: dict[str, Any]
    retrieve_url: str
    sample_path: Callable[[], str | None]


def select_page(candidates: list[Match], query: Query) -> tuple[list[Match], bool]:
    """The matches of ``query``'s filters, paged; and whether the cap cut them short."""
    found = [
        m
        for m in candidates
        if all(matches(m.attributes.get(k), v, k) for k, v in query.filters.items())
    ]
    return page(found, query)


T = TypeVar("T")


def page(items: list[T], query: Query) -> tuple[list[T], bool]:
    """``items`` from ``offset``, at most ``limit`` (without one, at most MAX_RESULTS); and
    whether that cap cut them short."""
    rest = items[query.offset :]
    limit = query.limit if query.limit is not None else MAX_RESULTS
    capped = query.limit is None and len(rest) > MAX_RESULTS
    return rest[: min(limit, MAX_RESULTS)], capped


def to_json(match: Match, level_keys: tuple[str, ...], query: Query) -> dict[str, Any]:
    """The DICOM JSON (PS3.18 F.2) of one answer: the level's attributes, the filters' and
    the included ones."""
    ds = Dataset()
    ds.SpecificCharacterSet = CHARSET
    wanted = set(level_keys) | set(query.filters)
    if query.include_all:
        wanted |= set(match.attributes)
    extra = []
    for keyword in sorted(query.include):
        if keyword in match.attributes:
            wanted.add(keyword)
        else:
            extra.append(keyword)
    for keyword in sorted(wanted):
        if keyword in match.attributes:
            _set(ds, keyword, match.attributes[keyword])
    if extra:
        path = match.sample_path()
        if path is not None:
            header = dcmread(path, stop_before_pixels=True, specific_tags=extra)
            for keyword in extra:
                if keyword in header:
                    ds[keyword] = header[keyword]
    ds.RetrieveURL = match.retrieve_url
    return ds.to_json_dict(suppress_invalid_tags=True)


def _set(ds: Dataset, keyword: str, value: Any) -> None:
    if value is None or value == "":
        setattr(ds, keyword, None)
    else:
        setattr(ds, keyword, value)
