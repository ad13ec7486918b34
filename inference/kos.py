"""The findings' key slices as a Key Object Selection document (PS3.3 A.59, TID 2010), for PACSs
that show "key images" but neither SR nor SEG: the PACS flags the source slices themselves.

- Document Title (113000, DCM, "Of Interest"); Key Object Description names the findings
  (``Nodule 1, Nodule 2: AI findings (aidx NAME@VERSION); not for clinical use``).
- It references each finding's key slice (its SOP Class and Instance UIDs), once, in volume
  order; the Current Requested Procedure Evidence Sequence lists them by study and series.
- Series number 9004, UIDs derived from the series, model and revision (the same on a rerun),
  Modality KO. No findings, no KOS (nothing is of interest): :func:`build_kos` returns None.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code

from models.registry import ModelCard

from .findings import Finding
from .results_common import (
    MANUFACTURER,
    SourceSeries,
    check_findings,
    result_uid,
    save_atomically,
    source_series,
)

KOS_SERIES_NUMBER = 9004
OF_INTEREST = Code("113000", "DCM", "Of Interest")


def build_kos(
    findings: Sequence[Finding],
    datasets: Sequence[Dataset],
    model: ModelCard,
    revision: int = 1,
    frames: Sequence[int | None] | None = None,
) -> hd.ko.KeyObjectSelectionDocument | None:
    """The KOS of the findings' key slices; ``datasets`` are the series' headers in volume
    order (as ``Volume.sop_uids``; ``frames`` as ``Volume.frames``). None without findings.
    ValueError on a finding whose key slice is not in the series."""
    if not findings:
        return None
    series = source_series(datasets, frames)
    check_findings(findings, series)
    slices = sorted({series.slice_of(f.key_sop_instance_uid, f.key_frame) for f in findings})
    keys = [series.datasets[k] for k in slices]
    names = ", ".join(f"Nodule {f.id}" for f in findings)
    description = f"{names}: AI findings (aidx {model.name}@{model.version}); not for clinical use"
    content = hd.ko.KeyObjectSelection(
        document_title=OF_INTEREST,
        referenced_objects=keys,
        description=description[:1024],  # a TEXT item; kept short for a PACS's list
    )
    document = hd.ko.KeyObjectSelectionDocument(
        evidence=list({str(k.SOPInstanceUID): k for k in keys}.values()),
        content=content,
        series_instance_uid=result_uid(series.series_uid, model, "kos-series"),
        series_number=KOS_SERIES_NUMBER,
        sop_instance_uid=result_uid(series.series_uid, model, "kos-instance", revision),
        instance_number=revision,
        manufacturer=MANUFACTURER,
    )
    _frame_numbers(document, {k: series.frame(k) for k in slices}, series)
    return document


def _frame_numbers(
    document: hd.ko.KeyObjectSelectionDocument, frames: dict[int, int | None], series: SourceSeries
) -> None:
    """Key frames of a multi-frame instance: each IMAGE item names its frame (Referenced Frame
    Number), in the order the items were made (the key slices'). highdicom references whole
    instances."""
    numbers = [frame for _, frame in sorted(frames.items())]
    if all(n is None for n in numbers):
        return
    items = [i for i in document.ContentSequence if i.ValueType == "IMAGE"]
    for item, number in zip(items, numbers, strict=True):
        if number is not None:
            item.ReferencedSOPSequence[0].ReferencedFrameNumber = number


def write_kos(
    findings: Sequence[Finding],
    datasets: Sequence[Dataset],
    model: ModelCard,
    path: Path,
    revision: int = 1,
    frames: Sequence[int | None] | None = None,
) -> Path | None:
    """Build the KOS (see :func:`build_kos`) and write it to ``path``; None (nothing written)
    without findings."""
    kos = build_kos(findings, datasets, model, revision, frames)
    if kos is None:
        return None
    save_atomically(kos, path)
    return path
