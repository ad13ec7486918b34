"""Shared by the result writer tests: a phantom read as the inference path reads it, findings
from its ground truth and label mask (tests/inference/test_results.py, test_kos, the viewers'
tests), and readers of the results (dciodvfy, highdicom)."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code

from inference.findings import Finding
from inference.volume import Volume, load_series
from models.registry import ModelCard
from tests.conftest import require_tool
from training.phantom import NoduleRequest, PhantomOptions, PhantomResult, generate

CHINESE_NAME = "王^小明"
PROBABILITIES = {1: 0.93, 2: 0.61}

NODULE = Code("27925004", "SCT", "Nodule")
LUNG = Code("39607008", "SCT", "Lung")
LONG_AXIS = Code("103339001", "SCT", "Long Axis")
SHORT_AXIS = Code("103340004", "SCT", "Short Axis")
DIAMETER = Code("81827009", "SCT", "Diameter")
MAXIMUM = Code("56851009", "SCT", "Maximum")
VOLUME = Code("118565006", "SCT", "Volume")
PROBABILITY = Code("122157", "DCM", "Probability")
ABSENT = Code("272519000", "SCT", "Absent")
IMAGING_MEASUREMENTS = Code("126010", "DCM", "Imaging Measurements")
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")
DEVICE = Code("121007", "DCM", "Device")
MORPHOLOGICALLY_ABNORMAL = Code("49755003", "SCT", "Morphologically abnormal structure")

CARD: dict[str, Any] = {
    "name": "nodule-detector",
    "version": "1.2.0",
    "date": "2026-11-28",
    "network": "test card",
    "description": "A card for the result writer tests.",
    "input": {
        "tensor": {"name": "image", "shape": [1, 1, "depth", "height", "width"]},
        "spacing_mm": [2.0, 1.0, 1.0],
        "hu_window": [-1000.0, 400.0],
        "patch_size": [32, 64, 64],
    },
    "output": {
        "tensor": {"name": "probability", "shape": [1, 1, "depth", "height", "width"]},
        "operating_threshold": 0.5,
    },
    "training": {"data": "none", "synthetic": True, "command": "none"},
    "sha256": "0" * 64,
    "intended_use": "Tests only.",
    "limitations": ["Not a detector."],
}
MODEL = ModelCard.model_validate(CARD)


@dataclass(frozen=True)
class Case:
    """A phantom read as the inference path reads it, with findings from its ground truth."""

    phantom: PhantomResult
    volume: Volume
    datasets: Sequence[Dataset]  # headers in volume order
    labels: NDArray[np.uint8]  # ground-truth labels on the volume grid (k, row, column)
    findings: list[Finding]


def make_case(out: Path, options: PhantomOptions) -> Case:
    phantom = generate(out, options)
    files = sorted(phantom.dicom_dir.glob("*.dcm"))
    volume = load_series(files)
    headers = {
        str(ds.SOPInstanceUID): ds
        for ds in (pydicom.dcmread(f, stop_before_pixels=True) for f in files)
    }
    datasets = [headers[uid] for uid in volume.sop_uids]
    labels = labels_on_volume_grid(phantom, volume, datasets)
    findings = [finding_from_truth(n, labels, volume) for n in phantom.ground_truth["nodules"]]
    return Case(phantom, volume, datasets, labels, findings)


def labels_on_volume_grid(
    phantom: PhantomResult, volume: Volume, datasets: Sequence[Dataset]
) -> NDArray[np.uint8]:
    """The NIfTI label volume on the volume grid.

    NIfTI array axes are (column, row, slice) with slices in instance order (Instance Number
    1, 2, ...); the volume's k runs along the slice normal. Each volume slice takes the NIfTI
    slice of its own instance, found by SOP Instance UID, not by assuming an order.
    """
    assert phantom.mask_path is not None
    image = nib.load(phantom.mask_path)
    assert isinstance(image, nib.Nifti1Image)
    data = np.asarray(image.dataobj, dtype=np.uint8)
    by_instance = data.transpose(2, 1, 0)  # (instance - 1, row, column)
    instance = [int(ds.InstanceNumber) - 1 for ds in datasets]
    assert [str(ds.SOPInstanceUID) for ds in datasets] == list(volume.sop_uids)
    return np.ascontiguousarray(by_instance[instance])


def finding_from_truth(
    nodule: dict[str, Any], labels: NDArray[np.uint8], volume: Volume
) -> Finding:
    mask = labels == nodule["id"]
    corners = volume.to_patient(np.argwhere(mask).astype(np.float64))
    lo, hi = corners.min(axis=0), corners.max(axis=0)
    return Finding(
        id=nodule["id"],
        probability=PROBABILITIES[nodule["id"]],
        center_mm=(nodule["center_mm"][0], nodule["center_mm"][1], nodule["center_mm"][2]),
        diameter_mm=nodule["diameter_mm"],
        volume_mm3=nodule["volume_mm3"],
        bbox_mm=((lo[0], lo[1], lo[2]), (hi[0], hi[1], hi[2])),
        key_sop_instance_uid=nodule["key_slice_sop_instance_uid"],
        mask=mask,
    )


# Two solid nodules (12 and 8 mm) with their label mask; also written for the viewers' tests.
TWO_NODULES = PhantomOptions(
    seed=5,
    slices=40,
    matrix=128,
    slice_thickness=2.5,
    nodule_requests=(
        NoduleRequest(12.0, "solid", "isolated", "smooth"),
        NoduleRequest(8.0, "solid", "isolated", "smooth"),
    ),
    patient_name=CHINESE_NAME,  # no charset given: the phantom writes UTF-8
    write_mask=True,
    workers=1,
)


def dciodvfy_errors(path: Path) -> list[str]:
    dciodvfy = require_tool("dciodvfy", "dicom3tools")
    result = subprocess.run(
        [dciodvfy, str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    lines = (result.stdout + result.stderr).splitlines()
    return [line for line in lines if line.startswith("Error")]


def report_of(path: Path) -> hd.sr.MeasurementReport:
    sr = hd.sr.srread(path)
    assert isinstance(sr.content, hd.sr.MeasurementReport)
    return sr.content


def text_items(group: hd.sr.MeasurementsAndQualitativeEvaluations) -> dict[str, str]:
    """TEXT content items of a group by code value (e.g. TID 4019 Algorithm Name, 111001)."""
    return {
        item.ConceptNameCodeSequence[0].CodeValue: str(item.TextValue)
        for item in group[0].ContentSequence
        if item.ValueType == "TEXT"
    }
