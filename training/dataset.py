"""The canonical training dataset format (torch-free); every data source has a converter to it.

A dataset is a folder::

    dataset.json
    images/<id>.nii.gz      CT in Hounsfield units (int16 when every value is a whole number
                            in range, float32 otherwise)
    labels/<id>.nii.gz      optional lesion labels (uint8/uint16): 0 background, value i marks
                            ``lesions[i-1]`` of that case

``dataset.json``::

    {"format": "aidx-dataset/1", "name": ..., "description": ...,
     "coordinates": "DICOM patient coordinates (LPS), mm",
     "cases": [{"id": ..., "image": "images/<id>.nii.gz", "label": "labels/<id>.nii.gz" | null,
                "lesions": [{"center_mm": [x, y, z], "diameter_mm": d}, ...],
                "source": {...provenance...}}]}

Coordinates. Lesion centres are DICOM patient coordinates (LPS, mm), as ImagePositionPatient and
the ``Finding`` record use. The NIfTI files follow the NIfTI convention instead: their affine
(sform and qform, code 1 "scanner") maps voxel indices to RAS mm, i.e. LPS with x and y negated::

    lps = diag(-1, -1, 1, 1) @ nifti_affine @ [i, j, k, 1]

Every image and label is written in one orientation: array axes (i, j, k) run along patient
x, y, z towards left, posterior and superior (so the NIfTI affine is diag(-sx, -sy, sz) plus a
translation for an axis-aligned scan). The NIfTI header stores the affine in float32, so positions
read back agree with the source to about 1e-5 mm. :func:`case_volume` returns an image as
``preprocess.to_lps`` does: axes (z, y, x) and the affine from those indices to LPS.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import nibabel as nib
import numpy as np
from numpy.typing import NDArray

FORMAT = "aidx-dataset/1"
COORDINATES = "DICOM patient coordinates (LPS), mm"
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
AXIS_TOLERANCE = 1e-3
T = TypeVar("T", bound=np.generic)
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class DatasetError(ValueError):
    """A dataset (or a source being converted) is invalid; the message names case and field."""


@dataclass(frozen=True)
class Lesion:
    """One lesion: centre in LPS mm and diameter in mm."""

    center_mm: tuple[float, float, float]
    diameter_mm: float

    def to_json(self) -> dict[str, Any]:
        return {"center_mm": list(self.center_mm), "diameter_mm": self.diameter_mm}


@dataclass
class Case:
    """One training case. ``image`` and ``label`` are paths relative to the dataset folder."""

    id: str
    image: str
    label: str | None
    lesions: list[Lesion] = field(default_factory=list)
    source: dict[str, Any] = field(default_factory=dict)
    root: Path | None = field(default=None, compare=False, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "image": self.image,
            "label": self.label,
            "lesions": [lesion.to_json() for lesion in self.lesions],
            "source": self.source,
        }

    def path(self, relative: str) -> Path:
        if self.root is None:
            raise DatasetError(f"case {self.id!r}: not attached to a dataset folder")
        return self.root / relative

    def validate(self) -> None:
        where = f"case {self.id!r}"
        if not isinstance(self.id, str) or not _ID.match(self.id):
            raise DatasetError(
                f"{where}: field 'id' must be 1-128 characters of letters, digits, '.', '_', '-'"
            )
        if self.image != f"images/{self.id}.nii.gz":
            raise DatasetError(f"{where}: field 'image' must be 'images/{self.id}.nii.gz'")
        if self.label is not None and self.label != f"labels/{self.id}.nii.gz":
            raise DatasetError(f"{where}: field 'label' must be 'labels/{self.id}.nii.gz' or null")
        for n, lesion in enumerate(self.lesions):
            centre = lesion.center_mm
            if len(centre) != 3 or not all(math.isfinite(v) for v in centre):
                raise DatasetError(f"{where}: lesions[{n}].center_mm must be 3 finite numbers")
            if not (math.isfinite(lesion.diameter_mm) and lesion.diameter_mm > 0):
                raise DatasetError(f"{where}: lesions[{n}].diameter_mm must be a positive number")
        if not isinstance(self.source, dict):
            raise DatasetError(f"{where}: field 'source' must be an object")


@dataclass
class Dataset:
    name: str
    description: str = ""
    cases: list[Case] = field(default_factory=list)
    root: Path | None = field(default=None, compare=False, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "name": self.name,
            "description": self.description,
            "coordinates": COORDINATES,
            "cases": [case.to_json() for case in self.cases],
        }

    def validate(self, check_files: bool = False) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise DatasetError("dataset: field 'name' must be a non-empty string")
        seen: set[str] = set()
        for case in self.cases:
            case.validate()
            if case.id in seen:
                raise DatasetError(f"case {case.id!r}: field 'id' is used by another case")
            seen.add(case.id)
            if check_files:
                for key, rel in (("image", case.image), ("label", case.label)):
                    if rel is not None and not case.path(rel).is_file():
                        raise DatasetError(f"case {case.id!r}: field {key!r}: {rel} is missing")

    @classmethod
    def load(cls, folder: Path) -> Dataset:
        """Read and validate ``folder/dataset.json`` (and that the files it names exist)."""
        folder = Path(folder)
        path = folder / "dataset.json"
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DatasetError(f"{path} not found") from None
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{path} is not valid JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise DatasetError(f"{path}: must hold a JSON object")
        if raw.get("format") != FORMAT:
            raise DatasetError(
                f"dataset: field 'format' must be {FORMAT!r}, got {raw.get('format')!r}"
            )
        if raw.get("coordinates") != COORDINATES:
            raise DatasetError(f"dataset: field 'coordinates' must be {COORDINATES!r}")
        cases_raw = raw.get("cases")
        if not isinstance(cases_raw, list):
            raise DatasetError("dataset: field 'cases' must be a list")
        cases = [_case_from_json(n, c, folder) for n, c in enumerate(cases_raw)]
        dataset = cls(
            name=raw.get("name", ""),
            description=str(raw.get("description", "")),
            cases=cases,
            root=folder,
        )
        dataset.validate(check_files=True)
        return dataset

    def write(self, folder: Path | None = None) -> Path:
        """Validate and write ``dataset.json`` (images and labels are written by write_case)."""
        folder = Path(folder) if folder is not None else self.root
        if folder is None:
            raise DatasetError("dataset: no folder to write to")
        self.root = folder
        for case in self.cases:
            case.root = folder
        self.validate(check_files=True)
        path = folder / "dataset.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2) + "\n", encoding="utf-8")
        tmp.replace(path)
        return path


def _case_from_json(n: int, raw: Any, root: Path) -> Case:
    if not isinstance(raw, dict):
        raise DatasetError(f"cases[{n}]: must be an object")
    case_id = raw.get("id")
    where = f"case {case_id!r}" if isinstance(case_id, str) else f"cases[{n}]"
    for key in ("id", "image", "label", "lesions", "source"):
        if key not in raw:
            raise DatasetError(f"{where}: field {key!r} is missing")
    if not isinstance(case_id, str):
        raise DatasetError(f"{where}: field 'id' must be a string")
    if not isinstance(raw["lesions"], list):
        raise DatasetError(f"{where}: field 'lesions' must be a list")
    lesions = []
    for m, les in enumerate(raw["lesions"]):
        try:
            centre = les["center_mm"]
            if not isinstance(centre, list) or len(centre) != 3:
                raise TypeError
            x, y, z = (float(v) for v in centre)
            diameter = float(les["diameter_mm"])
        except (KeyError, TypeError, ValueError):
            raise DatasetError(
                f"{where}: lesions[{m}] must be {{'center_mm': [x, y, z], 'diameter_mm': d}}"
            ) from None
        lesions.append(Lesion((x, y, z), diameter))
    image, label = raw["image"], raw["label"]
    if not isinstance(image, str):
        raise DatasetError(f"{where}: field 'image' must be a string")
    if label is not None and not isinstance(label, str):
        raise DatasetError(f"{where}: field 'label' must be a string or null")
    return Case(case_id, image, label, lesions, raw["source"], root)


# ------------------------------------------------------------------------------ geometry
def canonical(
    array: NDArray[Any], affine_lps: NDArray[np.float64]
) -> tuple[NDArray[Any], NDArray[np.float64]]:
    """Flip and transpose an axis-aligned array so its axes run along LPS x, y, z (increasing);
    returns the array and the affine from its indices to LPS mm. Oblique data is refused."""
    if array.ndim != 3:
        raise DatasetError(f"expected a 3-D volume, got shape {array.shape}")
    affine = np.array(affine_lps, dtype=np.float64)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    if np.any(spacing <= 0):
        raise DatasetError("the affine has a zero voxel spacing")
    directions = affine[:3, :3] / spacing
    patient_axis = np.argmax(np.abs(directions), axis=0)
    if len(set(patient_axis.tolist())) != 3 or np.any(
        np.abs(np.abs(directions).max(axis=0) - 1.0) > AXIS_TOLERANCE
    ):
        raise DatasetError("the volume is oblique (its axes are not along the patient's axes)")
    for axis in range(3):
        if directions[patient_axis[axis], axis] < 0:
            array = np.flip(array, axis=axis)
            affine[:3, 3] = affine[:3, 3] + affine[:3, axis] * (array.shape[axis] - 1)
            affine[:3, axis] = -affine[:3, axis]
    order = [int(np.nonzero(patient_axis == target)[0][0]) for target in (0, 1, 2)]
    out = np.eye(4)
    out[:3, :3] = affine[:3, :3][:, order]
    out[:3, 3] = affine[:3, 3]
    return np.ascontiguousarray(np.transpose(array, order)), out


def _save_nifti(path: Path, data: NDArray[Any], affine_lps: NDArray[np.float64]) -> None:
    affine_ras = LPS_TO_RAS @ affine_lps
    image = nib.Nifti1Image(data, affine_ras)  # type: ignore[no-untyped-call]
    image.header.set_xyzt_units("mm")  # type: ignore[no-untyped-call]
    image.set_qform(affine_ras, code=1)  # type: ignore[no-untyped-call]
    image.set_sform(affine_ras, code=1)  # type: ignore[no-untyped-call]
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, path)


def _load_nifti(path: Path) -> tuple[NDArray[Any], NDArray[np.float64]]:
    """Array in file order and the affine from its indices to LPS."""
    image: Any = nib.load(path)
    data = np.asanyarray(image.dataobj)
    return np.asarray(data), LPS_TO_RAS @ np.asarray(image.affine, dtype=np.float64)


def _hu_array(hu: NDArray[Any]) -> NDArray[Any]:
    values = np.asarray(hu)
    if np.issubdtype(values.dtype, np.integer):
        lo, hi = (int(values.min()), int(values.max())) if values.size else (0, 0)
        if lo >= -32768 and hi <= 32767:
            return values.astype(np.int16)
        return values.astype(np.float32)
    whole = bool(np.all(np.isfinite(values)) and np.all(values == np.round(values)))
    if whole and (values.size == 0 or (values.min() >= -32768 and values.max() <= 32767)):
        return values.astype(np.int16)
    return values.astype(np.float32)


def write_case(
    root: Path,
    case_id: str,
    hu: NDArray[Any],
    affine_lps: NDArray[np.float64],
    *,
    label: NDArray[Any] | None = None,
    lesions: Sequence[Lesion] = (),
    source: dict[str, Any] | None = None,
) -> Case:
    """Write one case's image (and label, on the same grid) in canonical orientation.

    ``affine_lps`` maps the indices of ``hu`` (any axis order) to LPS mm; ``label`` has the
    same shape and geometry. Returns the :class:`Case` to put in the dataset."""
    root = Path(root)
    case = Case(
        id=case_id,
        image=f"images/{case_id}.nii.gz",
        label=f"labels/{case_id}.nii.gz" if label is not None else None,
        lesions=list(lesions),
        source=dict(source or {}),
        root=root,
    )
    case.validate()
    if label is not None and label.shape != hu.shape:
        raise DatasetError(
            f"case {case_id!r}: field 'label' has shape {label.shape}, the image {hu.shape}"
        )
    try:
        image, affine = canonical(np.asarray(hu), affine_lps)
    except DatasetError as exc:
        raise DatasetError(f"case {case_id!r}: field 'image': {exc}") from None
    _save_nifti(case.path(case.image), _hu_array(image), affine)
    if label is not None and case.label is not None:
        lab, _ = canonical(np.asarray(label), affine_lps)
        top = int(lab.max()) if lab.size else 0
        dtype = np.uint8 if top <= 255 else np.uint16
        _save_nifti(case.path(case.label), lab.astype(dtype), affine)
    return case


def case_volume(
    case: Case, root: Path | None = None
) -> tuple[NDArray[np.float32], NDArray[np.float64]]:
    """The case's image as ``preprocess.to_lps`` gives one: HU with axes (z, y, x) increasing
    towards superior, posterior and left, and the 4×4 affine from (z, y, x) indices to LPS mm."""
    if root is not None:
        case.root = Path(root)
    data, affine = _load_nifti(case.path(case.image))
    return _zyx(data.astype(np.float32), affine, case.id)


def case_label(
    case: Case, root: Path | None = None
) -> tuple[NDArray[np.int32], NDArray[np.float64]] | None:
    """The case's label as (z, y, x) array and affine like :func:`case_volume`; None if none."""
    if root is not None:
        case.root = Path(root)
    if case.label is None:
        return None
    data, affine = _load_nifti(case.path(case.label))
    return _zyx(data.astype(np.int32), affine, case.id)


def _zyx(
    data: NDArray[T], affine_lps: NDArray[np.float64], case_id: str
) -> tuple[NDArray[T], NDArray[np.float64]]:
    try:
        xyz, affine = canonical(data, affine_lps)
    except DatasetError as exc:
        raise DatasetError(f"case {case_id!r}: {exc}") from None
    out = np.eye(4)
    out[:3, :3] = affine[:3, :3][:, ::-1]
    out[:3, 3] = affine[:3, 3]
    return np.ascontiguousarray(xyz.transpose(2, 1, 0)), out


def to_index(affine_lps: NDArray[np.float64], point: Sequence[float]) -> NDArray[np.float64]:
    """Fractional array indices of an LPS point under ``affine_lps``."""
    p = np.append(np.asarray(point, dtype=np.float64), 1.0)
    return np.asarray(np.linalg.solve(affine_lps, p)[:3])
