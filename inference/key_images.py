"""Key images: one Secondary Capture per finding, for PACSs whose viewers show neither SR nor SEG.

Each image is the finding's key slice in the lung window (W 1500 / L -600), in the source's row
and column order, with the finding's outline (red) and a box around it (yellow) burned in. The
objects are Secondary Capture Image Storage (PS3.3 A.8.1) with Burned In Annotation "YES", the
study's description, and the key slice as their Source Image Sequence (with a Derivation
Description); UIDs are derived from the series, model and finding, so that writing them twice
gives the same UIDs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from scipy import ndimage

from models.registry import ModelCard

from .findings import Finding
from .results_common import (
    MANUFACTURER,
    check_findings,
    result_uid,
    save_atomically,
    series_description,
    source_series,
)
from .volume import Volume

KEY_IMAGE_SERIES_NUMBER = 9003
LUNG_WINDOW = (-600.0, 1500.0)  # centre, width
RED = (255, 40, 40)
YELLOW = (255, 220, 0)
BOX_MARGIN = 4  # pixels between the outline and the box


def render_key_image(hu: NDArray[np.floating], mask: NDArray[np.bool_] | None) -> NDArray[np.uint8]:
    """RGB picture of a slice in the lung window with the mask's outline and box burned in."""
    centre, width = LUNG_WINDOW
    grey = np.clip((hu - (centre - width / 2)) / width, 0.0, 1.0)
    rgb = np.repeat((grey * 255).astype(np.uint8)[..., None], 3, axis=2)
    if mask is None or not mask.any():
        return rgb
    outline = mask & ~ndimage.binary_erosion(mask)
    rgb[outline] = RED
    rows, cols = np.nonzero(mask)
    r0, r1 = max(rows.min() - BOX_MARGIN, 0), min(rows.max() + BOX_MARGIN, mask.shape[0] - 1)
    c0, c1 = max(cols.min() - BOX_MARGIN, 0), min(cols.max() + BOX_MARGIN, mask.shape[1] - 1)
    rgb[r0, c0 : c1 + 1] = YELLOW
    rgb[r1, c0 : c1 + 1] = YELLOW
    rgb[r0 : r1 + 1, c0] = YELLOW
    rgb[r0 : r1 + 1, c1] = YELLOW
    return rgb


def build_key_images(
    findings: Sequence[Finding], volume: Volume, sources: Sequence[Dataset], model: ModelCard
) -> list[hd.sc.SCImage]:
    """One Secondary Capture per finding. ``sources`` are the series' headers in volume order."""
    if len(sources) != len(volume.sop_uids):
        raise ValueError(
            f"{len(sources)} source headers for a volume of {len(volume.sop_uids)} slices"
        )
    # One header per slice (a frame of a multi-frame instance as its frame view), with the
    # patient and study values that parse, the others left empty.
    series = source_series(sources, volume.frames or None)
    check_findings(findings, series)
    slices = [series.slice_of(f.key_sop_instance_uid, f.key_frame) for f in findings]
    images = []
    for finding, k in zip(findings, slices, strict=True):
        source = series.datasets[k]
        mask = finding.mask[k] if finding.mask is not None else None
        picture = render_key_image(volume.hu[k], mask)
        spacing = tuple(float(v) for v in source.PixelSpacing)
        image = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=source,
            pixel_array=picture,
            photometric_interpretation="RGB",
            bits_allocated=8,
            coordinate_system="PATIENT",
            series_instance_uid=result_uid(volume.series_uid, model, "key-image-series"),
            series_number=KEY_IMAGE_SERIES_NUMBER,
            sop_instance_uid=result_uid(volume.series_uid, model, f"key-image-{finding.id}"),
            instance_number=finding.id,
            manufacturer=MANUFACTURER,
            pixel_spacing=(spacing[0], spacing[1]),  # type: ignore[arg-type]  # mm, floats
            patient_orientation=_orientation(source),
            series_description=series_description("AI key images", model),
        )
        image.BurnedInAnnotation = "YES"
        # What it shows and where it comes from: the study's description, and the source
        # slice (General Image: Source Image Sequence), so that a viewer can jump to it.
        if source.get("StudyDescription"):
            image.StudyDescription = source.StudyDescription
        reference = Dataset()
        reference.ReferencedSOPClassUID = source.SOPClassUID
        reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
        if series.frame(k) is not None:
            reference.ReferencedFrameNumber = series.frame(k)
        image.SourceImageSequence = [reference]
        image.DerivationDescription = (
            "Source slice in the lung window (W 1500, L -600) with the AI finding's outline "
            "and box burned in"
        )
        # The body part tells validators that Laterality (Type 2C) is not needed: unpaired.
        if source.get("BodyPartExamined"):
            image.BodyPartExamined = source.BodyPartExamined
        else:  # unknown (e.g. a Legacy Converted Enhanced CT keeps it in its frames): Type 2
            image.Laterality = ""
        image.ImageComments = (
            f"Nodule {finding.id}: p={finding.probability:.2f}, {finding.diameter_mm:.1f} mm "
            f"(aidx {model.name}@{model.version}; not for clinical use)"
        )
        images.append(image)
    return images


def _orientation(ds: Dataset) -> tuple[str, str]:
    """Patient Orientation of the rows and columns (PS3.3 C.7.6.1.1.1) from the source's
    direction cosines: the patient direction each runs towards."""
    iop = [float(v) for v in ds.ImageOrientationPatient]
    letters = (("R", "L"), ("A", "P"), ("F", "H"))  # negative, positive along x, y, z

    def letter(vector: list[float]) -> str:
        axis = int(np.argmax(np.abs(vector)))
        return letters[axis][1] if vector[axis] > 0 else letters[axis][0]

    return letter(iop[:3]), letter(iop[3:])


def write_key_images(
    findings: Sequence[Finding],
    volume: Volume,
    sources: Sequence[Dataset],
    model: ModelCard,
    out_dir: Path,
) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for image, finding in zip(
        build_key_images(findings, volume, sources, model), findings, strict=True
    ):
        path = out_dir / f"key_image_{finding.id:03d}.dcm"
        save_atomically(image, path)
        paths.append(path)
    return paths
