"""Multi-frame CT test data made from a single-frame CT series (a phantom's ``dicom`` folder).

- :func:`legacy_enhanced_ct` / :func:`write_legacy_enhanced_ct`: Legacy Converted Enhanced CT
  Image Storage (1.2.840.10008.5.1.4.1.1.2.2), by highdicom's legacy converter.
- :func:`enhanced_ct` / :func:`write_enhanced_ct`: Enhanced CT Image Storage
  (1.2.840.10008.5.1.4.1.1.2.1), built here (highdicom and pydicom have no builder for it): the
  Enhanced CT Image IOD's modules and functional groups, with the phantom's acquisition values.
- :func:`reorder_frames`: the same instance with its frames in another order (per-frame
  functional groups and pixel data together), as a modality may store them.

Both builders keep the source's pixel values, geometry and rescale, so that the multi-frame
volume must equal the single-frame one exactly. Frame f of the result is the f-th source slice
in the order given for :func:`enhanced_ct` (files sorted by name: Instance Number order for a
phantom); highdicom's converter orders its frames by position itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from copy import deepcopy
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from highdicom.legacy import LegacyConvertedEnhancedCTImage
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    EnhancedCTImageStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)


def read_slices(source: Path | Sequence[Path]) -> list[Dataset]:
    """The single-frame datasets of a folder's ``*.dcm`` files (sorted by name), or of files."""
    files = sorted(source.glob("*.dcm")) if isinstance(source, Path) else list(source)
    if not files:
        raise ValueError(f"no DICOM files in {source}")
    return [pydicom.dcmread(f) for f in files]


def legacy_enhanced_ct(
    slices: Sequence[Dataset], *, series_uid: str | None = None, series_number: int = 900
) -> Dataset:
    """The Legacy Converted Enhanced CT image of single-frame CT ``slices`` (one series)."""
    return LegacyConvertedEnhancedCTImage(
        list(slices),
        series_instance_uid=series_uid or generate_uid(),
        series_number=series_number,
        sop_instance_uid=generate_uid(),
        instance_number=1,
    )


def write_legacy_enhanced_ct(
    source: Path | Sequence[Path], out: Path, *, series_uid: str | None = None
) -> Path:
    """Write the Legacy Converted Enhanced CT of a folder of slices (or of files) to ``out``."""
    ds = legacy_enhanced_ct(read_slices(source), series_uid=series_uid)
    out.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(out, enforce_file_format=True)
    return out


def _item(**values: Any) -> Dataset:
    item = Dataset()
    for keyword, value in values.items():
        setattr(item, keyword, value)
    return item


def _seq(**values: Any) -> DicomSequence:
    """A sequence of one item holding ``values``."""
    return DicomSequence([_item(**values)])


def _code(value: str, scheme: str, meaning: str) -> DicomSequence:
    return _seq(CodeValue=value, CodingSchemeDesignator=scheme, CodeMeaning=meaning)


COPIED = (
    # Patient, General Study, General Series, General Equipment, Frame of Reference.
    "SpecificCharacterSet",
    "StudyDate",
    "SeriesDate",
    "StudyTime",
    "SeriesTime",
    "AccessionNumber",
    "Manufacturer",
    "InstitutionName",
    "ReferringPhysicianName",
    "StudyDescription",
    "ManufacturerModelName",
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "BodyPartExamined",
    "SoftwareVersions",
    "ProtocolName",
    "PatientPosition",
    "StudyInstanceUID",
    "StudyID",
    "FrameOfReferenceUID",
    "PositionReferenceIndicator",
    # Image Pixel.
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
)


def _datetime(ds: Dataset) -> str:
    date = str(ds.get("AcquisitionDate") or ds.get("StudyDate") or "19700101")
    time = str(ds.get("AcquisitionTime") or ds.get("StudyTime") or "000000")
    return date + time


def enhanced_ct(
    slices: Sequence[Dataset],
    *,
    series_uid: str | None = None,
    series_number: int = 901,
    sop_uid: str | None = None,
) -> Dataset:
    """An Enhanced CT Image Storage instance holding ``slices`` (single-frame CT images of one
    series, all of one size, orientation and pixel spacing) as its frames, in the given order.

    Shared functional groups: pixel measures, plane orientation, pixel value transformation (one
    rescale for all, the first slice's, unless the slices differ: then per frame), VOI LUT,
    frame anatomy and the CT macros; per frame: frame content (stack and in-stack position,
    counted along the slice normal), plane position and CT position.
    """
    first = slices[0]
    n = len(slices)
    iop = [float(v) for v in first.ImageOrientationPatient]
    normal = np.cross(iop[:3], iop[3:])
    along = [float(np.dot([float(v) for v in s.ImagePositionPatient], normal)) for s in slices]
    in_stack = {i: p + 1 for p, i in enumerate(np.argsort(along, kind="stable"))}
    acquired = _datetime(first)

    ds = Dataset()
    for keyword in COPIED:
        if keyword in first:
            setattr(ds, keyword, deepcopy(first.get(keyword)))
    ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    ds.SOPClassUID = EnhancedCTImageStorage
    ds.SOPInstanceUID = sop_uid or generate_uid()
    ds.Modality = "CT"
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.SeriesNumber = series_number
    ds.SeriesDescription = f"{first.get('SeriesDescription', '')} (enhanced)".strip()
    ds.InstanceNumber = 1
    ds.ContentDate = acquired[:8]
    ds.ContentTime = acquired[8:]
    ds.AcquisitionDateTime = acquired
    ds.AcquisitionDuration = 10.0
    ds.AcquisitionNumber = 1
    # Enhanced General Equipment (all Type 1).
    ds.DeviceSerialNumber = "0001"
    ds.SoftwareVersions = first.get("SoftwareVersions") or "1"
    ds.Manufacturer = first.get("Manufacturer") or "aidx"
    ds.ManufacturerModelName = first.get("ManufacturerModelName") or "phantom"
    # Enhanced CT Image.
    ds.ContentQualification = "RESEARCH"
    ds.PixelPresentation = "MONOCHROME"
    ds.VolumetricProperties = "VOLUME"
    ds.VolumeBasedCalculationTechnique = "NONE"
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.PresentationLUTShape = "IDENTITY"
    ds.ImageComments = str(first.get("ImageComments", "")) or "test data"
    ds.AcquisitionContextSequence = DicomSequence([])
    ds.NumberOfFrames = n
    # Multi-frame Dimension: one stack, frames indexed by their position in it.
    dimension_uid = generate_uid()
    ds.DimensionOrganizationSequence = _seq(DimensionOrganizationUID=dimension_uid)
    ds.DimensionOrganizationType = "3D"
    ds.DimensionIndexSequence = DicomSequence(
        [
            _item(
                DimensionOrganizationUID=dimension_uid,
                DimensionIndexPointer=pydicom.tag.Tag("StackID"),
                FunctionalGroupPointer=pydicom.tag.Tag("FrameContentSequence"),
                DimensionDescriptionLabel="Stack ID",
            ),
            _item(
                DimensionOrganizationUID=dimension_uid,
                DimensionIndexPointer=pydicom.tag.Tag("InStackPositionNumber"),
                FunctionalGroupPointer=pydicom.tag.Tag("FrameContentSequence"),
                DimensionDescriptionLabel="In-Stack Position Number",
            ),
        ]
    )

    rescales = {(str(s.RescaleSlope), str(s.RescaleIntercept)) for s in slices}
    per_frame_rescale = len(rescales) > 1
    shared = _item(
        PixelMeasuresSequence=_seq(
            PixelSpacing=deepcopy(first.PixelSpacing),
            SliceThickness=first.SliceThickness,
        ),
        PlaneOrientationSequence=_seq(
            ImageOrientationPatient=deepcopy(first.ImageOrientationPatient)
        ),
        FrameAnatomySequence=_seq(
            AnatomicRegionSequence=_code("51185008", "SCT", "Thorax"), FrameLaterality="U"
        ),
        FrameVOILUTSequence=_seq(
            WindowCenter=deepcopy(first.get("WindowCenter", "40")),
            WindowWidth=deepcopy(first.get("WindowWidth", "400")),
        ),
        CTImageFrameTypeSequence=_seq(
            FrameType=["ORIGINAL", "PRIMARY", "VOLUME", "NONE"],
            PixelPresentation="MONOCHROME",
            VolumetricProperties="VOLUME",
            VolumeBasedCalculationTechnique="NONE",
        ),
        CTAcquisitionTypeSequence=_seq(
            AcquisitionType="SPIRAL", ConstantVolumeFlag="NO", FluoroscopyFlag="NO"
        ),
        CTAcquisitionDetailsSequence=_seq(
            DataCollectionDiameter=first.get("DataCollectionDiameter") or "500",
            GantryDetectorTilt=first.get("GantryDetectorTilt") or "0",
            TableHeight=first.get("TableHeight") or "150",
            RotationDirection=first.get("RotationDirection") or "CW",
            RevolutionTime=0.5,
            SingleCollimationWidth=0.625,
            TotalCollimationWidth=40.0,
        ),
        CTTableDynamicsSequence=_seq(
            TableSpeed=80.0, TableFeedPerRotation=40.0, SpiralPitchFactor=1.0
        ),
        CTGeometrySequence=_seq(
            DistanceSourceToDetector=1040.0, DistanceSourceToDataCollectionCenter=570.0
        ),
        CTReconstructionSequence=_seq(
            ReconstructionAlgorithm="FILTER_BACK_PROJ",
            ConvolutionKernel=first.get("ConvolutionKernel") or "STANDARD",
            ConvolutionKernelGroup="SOFT_TISSUE",
            ReconstructionDiameter=first.get("ReconstructionDiameter")
            or float(first.PixelSpacing[0]) * int(first.Columns),
            ReconstructionPixelSpacing=deepcopy(first.PixelSpacing),
            ReconstructionAngle=360.0,
            ImageFilter="NONE",
        ),
        CTExposureSequence=_seq(
            ExposureTimeInms=float(first.get("ExposureTime") or 500),
            XRayTubeCurrentInmA=float(first.get("XRayTubeCurrent") or 200),
            ExposureInmAs=float(first.get("Exposure") or 100),
            ExposureModulationType="NONE",
            CTDIvol=10.0,
            CTDIPhantomTypeCodeSequence=_code("113691", "DCM", "IEC Body Dosimetry Phantom"),
        ),
        CTXRayDetailsSequence=_seq(
            KVP=first.get("KVP") or "120",
            FocalSpots=[0.7],
            FilterType="BODY",
            FilterMaterial=["ALUMINUM"],
        ),
        IrradiationEventIdentificationSequence=_seq(IrradiationEventUID=generate_uid()),
    )
    if not per_frame_rescale:
        shared.PixelValueTransformationSequence = _rescale(first)
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])

    per_frame = []
    for i, s in enumerate(slices):
        position = [float(v) for v in s.ImagePositionPatient]
        item = _item(
            FrameContentSequence=_seq(
                FrameAcquisitionNumber=1,
                FrameReferenceDateTime=acquired,
                FrameAcquisitionDateTime=acquired,
                FrameAcquisitionDuration=500.0,
                StackID="1",
                InStackPositionNumber=in_stack[i],
                DimensionIndexValues=[1, in_stack[i]],
            ),
            PlanePositionSequence=_seq(ImagePositionPatient=deepcopy(s.ImagePositionPatient)),
            CTPositionSequence=_seq(
                TablePosition=position[2],
                ReconstructionTargetCenterPatient=_centre(s),
                DataCollectionCenterPatient=_centre(s),
            ),
        )
        if per_frame_rescale:
            item.PixelValueTransformationSequence = _rescale(s)
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(per_frame)

    ds.PixelData = b"".join(s.PixelData for s in slices)
    ds.InstanceCreationDate = ds.ContentDate
    ds.InstanceCreationTime = ds.ContentTime
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = EnhancedCTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    return ds


def _rescale(s: Dataset) -> DicomSequence:
    return _seq(
        RescaleIntercept=s.RescaleIntercept,
        RescaleSlope=s.RescaleSlope,
        RescaleType=str(s.get("RescaleType") or "HU"),
    )


def _centre(s: Dataset) -> list[float]:
    """Patient coordinates of the middle of a slice."""
    iop = [float(v) for v in s.ImageOrientationPatient]
    position = np.array([float(v) for v in s.ImagePositionPatient])
    dy, dx = (float(v) for v in s.PixelSpacing)
    centre = (
        position
        + np.array(iop[:3]) * dx * (int(s.Columns) - 1) / 2
        + np.array(iop[3:]) * dy * (int(s.Rows) - 1) / 2
    )
    return [round(float(v), 4) for v in centre]


def write_enhanced_ct(
    source: Path | Sequence[Path], out: Path, *, series_uid: str | None = None
) -> Path:
    """Write the Enhanced CT image of a folder of slices (or of files) to ``out``."""
    ds = enhanced_ct(read_slices(source), series_uid=series_uid)
    out.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(out, enforce_file_format=True)
    return out


def reorder_frames(ds: Dataset, order: Sequence[int]) -> Dataset:
    """``ds`` (native, uncompressed pixel data) with its frames in another order: new frame f
    (1-based) is old frame ``order[f - 1] + 1``. Per-frame functional groups move with their
    pixels; the SOP Instance UID stays (the same image, stored another way)."""
    n = int(ds.NumberOfFrames)
    if sorted(order) != list(range(n)):
        raise ValueError(f"order must be a permutation of 0..{n - 1}")
    frame_bytes = int(ds.Rows) * int(ds.Columns) * int(ds.SamplesPerPixel) * ds.BitsAllocated // 8
    data = bytes(ds.PixelData)
    out = deepcopy(ds)
    out.PixelData = b"".join(data[i * frame_bytes : (i + 1) * frame_bytes] for i in order)
    items = ds.PerFrameFunctionalGroupsSequence
    out.PerFrameFunctionalGroupsSequence = DicomSequence([deepcopy(items[i]) for i in order])
    return out
