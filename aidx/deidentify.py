"""De-identification of DICOM data sets: PS3.15 Annex E, the Basic Application Level
Confidentiality Profile, with the Retain Longitudinal Temporal Information with Full Dates and
the Clean Descriptors options on request.

The profile's actions per attribute are PS3.15 Table E.1-1 as the ``dicom-anonymizer`` package
(KitwareMedical) ships it (:data:`PROFILE_EDITION`); this module applies them with pydicom, at
every depth of every sequence:

- ``X`` removes, ``Z`` empties, ``D`` puts a dummy value of the attribute's VR, ``U`` replaces a
  UID by :meth:`Deidentifier.uid`; where the table allows a choice (``X/Z``, ``Z/D``, ``X/D``,
  ``X/Z/D``) an attribute keeps a value where allowed (``D``, else ``Z``), so that a Type 1 or 2
  attribute stays present and the object valid whatever the IOD; a sequence is emptied (``Z``)
  or removed instead. Patient ID's dummy is a pseudonym keyed like the UIDs, so one patient's
  exports stay linked. ``X/Z/U*`` sequences (Referenced Image, Source Image) keep their items
  with the UIDs replaced;
- a ``D`` sequence (Content Sequence, Verifying Observer Sequence) keeps its items, each
  de-identified by the same table: the SR content aidx writes is codes, numbers, coordinates
  and UIDs; a person's name in it gets a dummy and a text item is kept only if clean (below),
  which is the Clean Structured Content option (declared on objects that have content);
- private attributes are removed;
- UIDs are replaced by ``2.25.<UUID>`` derived with HMAC-SHA256 from the original UID under a
  secret key: the same UID gives the same new UID in every image, SR and SEG (so the results
  still reference their images) and in every export made with the same key (a re-export gives
  the same UIDs), and cannot be traced back without the key;
- Retain Longitudinal Temporal Information with Full Dates: attributes of VR DA, DT and TM keep
  their values, those of the patient (group 0010: the birth date) excepted; without it, they are
  dummies (``19000101``), empty or removed as the table says;
- Clean Descriptors: descriptions, comments and the protocol name (text attributes whose
  keyword says so, :data:`DESCRIPTOR`; ``dicom-anonymizer`` ships the profile's column, not the
  option's) are kept when they hold none of the identifying values of the data sets exported
  together (names, IDs, birth dates, institution: what the profile removes), removed otherwise;
- every data set gets Patient Identity Removed ``YES``, De-identification Method (Code
  Sequence) naming the profile and the options applied (CID 7050), and Longitudinal Temporal
  Information Modified.

Pixel data are not examined (the Clean Pixel Data option is not offered): an image that says
it has burned-in annotation is refused (:class:`DeidentificationError`).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import uuid
from dataclasses import dataclass
from typing import Any, Final

from dicomanonymizer.dicom_anonymization_databases import dicomfields_2026c as _table
from pydicom.datadict import keyword_for_tag
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag, Tag

PROFILE_EDITION: Final = "PS3.15 2026c Table E.1-1 (dicom-anonymizer 2.1)"
# The table's categories and the actions each allows (``XZU`` is X/Z/U*).
_CATEGORIES: Final = {
    "D_TAGS": "D",
    "Z_TAGS": "Z",
    "X_TAGS": "X",
    "U_TAGS": "U",
    "Z_D_TAGS": "ZD",
    "X_Z_TAGS": "XZ",
    "X_D_TAGS": "XD",
    "X_Z_D_TAGS": "XZD",
    "X_Z_U_STAR_TAGS": "XZU",
}
DATE_VRS: Final = frozenset({"DA", "DT", "TM"})
TEXT_VRS: Final = frozenset({"LO", "SH", "LT", "ST", "UT", "UC"})
# Clean Descriptors: text attributes named as descriptions, comments or the like.
DESCRIPTOR: Final = re.compile(
    r"(Description|Comments?|History|Alerts|Allergies|Occupation|ProtocolName|ReasonForStudy"
    r"|PatientState|TextString)$"
)
TEXT_VALUE: Final = Tag(0x0040, 0xA160)  # a TEXT content item's value (structured content)
PATIENT_ID: Final = Tag(0x0010, 0x0020)
PATIENT_GROUP: Final = 0x0010
_DUMMY: Final[dict[str, Any]] = {
    "DA": "19000101",
    "TM": "000000",
    "DT": "19000101000000",
    "AS": "000Y",
    "IS": "0",
    "DS": "0",
    "US": 0,
    "SS": 0,
    "UL": 0,
    "SL": 0,
    "UV": 0,
    "SV": 0,
    "FL": 0.0,
    "FD": 0.0,
}
DUMMY_TEXT: Final = "ANONYMIZED"
DUMMY_NAME: Final = "ANONYMIZED^"  # a PN with its component separator (no retired form)


@dataclass(frozen=True)
class Option:
    """One entry of CID 7050 (De-identification Method): code value and meaning."""

    code: str
    meaning: str


BASIC_PROFILE: Final = Option("113100", "Basic Application Confidentiality Profile")
CLEAN_STRUCTURED_CONTENT: Final = Option("113104", "Clean Structured Content Option")
CLEAN_DESCRIPTORS: Final = Option("113105", "Clean Descriptors Option")
RETAIN_FULL_DATES: Final = Option(
    "113106", "Retain Longitudinal Temporal Information Full Dates Option"
)


@dataclass(frozen=True)
class Options:
    """The profile's options asked for (the Basic profile itself always applies)."""

    retain_full_dates: bool = False
    clean_descriptors: bool = False

    def names(self) -> list[str]:
        """Short names, for messages and the audit log."""
        return [
            name
            for name, on in (
                ("retain-full-dates", self.retain_full_dates),
                ("clean-descriptors", self.clean_descriptors),
            )
            if on
        ]


class DeidentificationError(ValueError):
    """A data set that cannot be de-identified as asked; the message names its SOP Instance
    UID (never a patient attribute) and why."""


def _profile() -> tuple[dict[BaseTag, str], list[tuple[int, int, int, int, str]]]:
    single: dict[BaseTag, str] = {}
    groups: list[tuple[int, int, int, int, str]] = []
    for category, actions in _CATEGORIES.items():
        for entry in getattr(_table, category):
            if len(entry) == 2:
                single[Tag(entry[0], entry[1])] = actions
            else:
                group, element, group_mask, element_mask = entry
                groups.append((group, element, group_mask, element_mask, actions))
    return single, groups


_SINGLE, _GROUPS = _profile()


def profile_action(tag: BaseTag) -> str | None:
    """The actions Table E.1-1 allows for ``tag`` (e.g. ``"X"``, ``"XZD"``), or None when the
    profile keeps it (private tags aside: the profile removes them all)."""
    found = _SINGLE.get(tag)
    if found is not None:
        return found
    for group, element, group_mask, element_mask, actions in _GROUPS:
        if tag.group & group_mask == group & group_mask and (
            tag.element & element_mask == element & element_mask
        ):
            return actions
    return None


def is_descriptor(tag: BaseTag, vr: str) -> bool:
    """Whether the Clean Descriptors option covers ``tag`` (a text attribute named as a
    description, comment, history or the protocol name)."""
    return vr in TEXT_VRS and bool(DESCRIPTOR.search(keyword_for_tag(tag) or ""))


class Deidentifier:
    """De-identifies data sets with one key and one set of options (see the module).

    Call :meth:`learn` with every data set of an export first (it gathers the identifying
    values that cleaned text must not hold), then :meth:`apply` to each.
    """

    def __init__(self, key: bytes, options: Options) -> None:
        if len(key) < 16:
            raise ValueError("the de-identification key needs at least 16 bytes")
        self._key = key
        self.options = options
        self._identifying: set[str] = set()

    # ----------------------------------------------------------------------------- values
    def uid(self, original: str) -> str:
        """The new UID of ``original``: ``2.25.`` and a UUID from HMAC-SHA256 under the key
        (at most 44 characters)."""
        digest = hmac.new(self._key, b"uid\0" + original.encode("utf-8"), hashlib.sha256)
        return f"2.25.{uuid.UUID(bytes=digest.digest()[:16], version=4).int}"

    def pseudonym(self, patient_id: str) -> str:
        """Patient ID's replacement: the same patient gets the same one under the same key."""
        digest = hmac.new(self._key, b"patient\0" + patient_id.encode("utf-8"), hashlib.sha256)
        return "ANON-" + digest.hexdigest()[:16].upper()

    def learn(self, ds: Dataset) -> None:
        """Note the identifying values in ``ds``: every name, and every text, ID or date the
        profile removes (descriptions excepted: they are what gets cleaned)."""
        for elem in ds.iterall():
            if elem.VR == "SQ" or elem.tag.is_private or elem.value in (None, ""):
                continue
            values = elem.value if isinstance(elem.value, MultiValue) else [elem.value]
            if elem.VR == "PN":
                for value in values:
                    parts = re.split(r"[\^=\s,]+", str(value))
                    # Latin names from 3 letters; a Chinese or Japanese name's components are
                    # often one or two characters, and as rare in descriptions.
                    self._identifying.update(
                        p.lower() for p in parts if len(p) >= 3 or (p and not p.isascii())
                    )
                continue
            action = profile_action(elem.tag)
            if action is None or action == "U" or is_descriptor(elem.tag, elem.VR):
                continue
            if elem.VR in TEXT_VRS | {"DA", "DT"}:
                self._identifying.update(
                    str(v).strip().lower() for v in values if len(str(v).strip()) >= 3
                )

    def is_clean(self, text: str) -> bool:
        """Whether ``text`` holds none of the identifying values learnt."""
        low = text.lower()
        return not any(value in low for value in self._identifying)

    # ---------------------------------------------------------------------------- datasets
    def apply(self, ds: Dataset) -> Dataset:
        """De-identify ``ds`` in place (a study's images are large: no copy) and give it a new
        File Meta Information naming its new SOP Instance UID; returns ``ds``."""
        sop = str(ds.get("SOPInstanceUID", "?"))
        if str(ds.get("BurnedInAnnotation", "")).upper() == "YES":
            raise DeidentificationError(
                f"instance {sop} says it has burned-in annotation (text in the pixels, which "
                "this export does not clean): leave its series out of the export or clean it "
                "first"
            )
        old_meta = getattr(ds, "file_meta", FileMetaDataset())
        self._visit(ds)
        applied = [BASIC_PROFILE]
        if "ContentSequence" in ds:
            applied.append(CLEAN_STRUCTURED_CONTENT)
        if self.options.clean_descriptors:
            applied.append(CLEAN_DESCRIPTORS)
        if self.options.retain_full_dates:
            applied.append(RETAIN_FULL_DATES)
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethod = [o.meaning for o in applied]
        ds.DeidentificationMethodCodeSequence = Sequence([_code(o) for o in applied])
        ds.LongitudinalTemporalInformationModified = (
            "UNMODIFIED" if self.options.retain_full_dates else "REMOVED"
        )
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = old_meta.get("TransferSyntaxUID", "1.2.840.10008.1.2.1")
        ds.file_meta = meta
        return ds

    def _visit(self, ds: Dataset) -> None:
        for elem in list(ds):
            tag = elem.tag
            if tag.is_private or tag.element == 0:  # private; group lengths (retired)
                del ds[tag]
                continue
            action = profile_action(tag)
            if elem.VR == "SQ":
                self._sequence(ds, elem, action)
            else:
                self._element(ds, elem, action)

    def _sequence(self, ds: Dataset, elem: DataElement, action: str | None) -> None:
        if action is None or action in ("D", "U", "XZU"):
            for item in elem.value:
                self._visit(item)
        elif "Z" in action:
            elem.value = Sequence([])
        else:
            del ds[elem.tag]

    def _element(self, ds: Dataset, elem: DataElement, action: str | None) -> None:
        tag, vr = elem.tag, elem.VR
        if action is None:
            if tag == TEXT_VALUE and not self.is_clean(str(elem.value or "")):
                elem.value = DUMMY_TEXT  # structured content: a text item that names someone
            return
        if elem.value in (None, "", b"") and action != "X":
            return  # empty already: nothing to hide
        if "U" in action:
            if vr == "UI":
                elem.value = _map(elem.value, self.uid)
            return
        if self.options.retain_full_dates and vr in DATE_VRS and tag.group != PATIENT_GROUP:
            return  # the study's dates and times, not the patient's (birth date)
        if (
            self.options.clean_descriptors
            and is_descriptor(tag, vr)
            and all(self.is_clean(str(v)) for v in _values(elem.value))
        ):
            return
        if "D" in action:
            if tag == PATIENT_ID:
                elem.value = self.pseudonym(str(elem.value))
            elif vr in _DUMMY:
                elem.value = _DUMMY[vr]
            elif vr in {"OB", "OW", "OF", "OD", "OL", "OV", "UN", "UR"}:
                elem.value = b"" if vr != "UR" else ""
            elif vr == "PN":
                elem.value = DUMMY_NAME
            else:  # CS, AE and the text VRs
                elem.value = DUMMY_TEXT
        elif "Z" in action:
            elem.value = b"" if isinstance(elem.value, bytes) else ""
        else:
            del ds[tag]


# ------------------------------------------------------------------------------ helpers
def _values(value: Any) -> list[Any]:
    return list(value) if isinstance(value, MultiValue | list) else [value]


def _map(value: Any, new: Any) -> Any:
    if isinstance(value, MultiValue | list):
        return [new(str(v)) for v in value]
    return new(str(value))


def _code(option: Option) -> Dataset:
    item = Dataset()
    item.CodeValue = option.code
    item.CodingSchemeDesignator = "DCM"
    item.CodeMeaning = option.meaning
    return item
