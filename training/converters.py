"""Converters from data sources to the canonical dataset (see training/dataset.py); torch-free.

- phantoms: :func:`phantom_dataset` generates studies with training.phantom and converts them
  (DICOM read with inference.volume.load_series; label from the phantom's nodule mask; lesions
  from its ground_truth.json).
- Medical Segmentation Decathlon (e.g. Task06_Lung): :func:`msd_dataset`. Lesions are the
  26-connected components of the label (label > 0); centre = the component's voxel centroid
  mapped through the image affine to LPS; diameter = the equivalent-sphere diameter
  ``(6 V / pi) ** (1/3)`` of the component's volume V (voxel count x voxel volume).
- LUNA16: :func:`luna16_dataset` reads MetaImage (.mhd/.raw, .mha) volumes and annotations.csv
  (seriesuid, coordX, coordY, coordZ, diameter_mm). LUNA16 world coordinates are ITK physical
  coordinates, i.e. LPS mm, so they are used as they are. LUNA16 has no masks: label is null.
- DICOM series with DICOM SEG: see training/converters_dicom.py.
"""

from __future__ import annotations

import csv
import json
import math
import zlib
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from inference.volume import load_series

from .dataset import LPS_TO_RAS, Case, Dataset, DatasetError, Lesion, canonical, write_case
from .phantom import PhantomOptions, generate


# ---------------------------------------------------------------------------- phantoms
def phantom_dataset(
    out: Path,
    cases: int,
    seed: int,
    slices: int = 96,
    matrix: int = 256,
    *,
    nodules: int | None = None,
    diameter_range: tuple[float, float] = (3.0, 30.0),
    work: Path | None = None,
    workers: int = 1,
) -> Dataset:
    """Generate ``cases`` phantom studies (seeds seed, seed+1, ...) and convert them into the
    canonical dataset at ``out``. The DICOM studies are kept under ``work`` (default
    ``out/sources/phantoms``). ``workers`` > 1 generates cases in that many processes (each
    case depends on its seed alone, so the dataset is the same)."""
    out = Path(out)
    if cases < 1:
        raise DatasetError(f"cases must be at least 1, got {cases}")
    work = Path(work) if work is not None else out / "sources" / "phantoms"
    dataset = Dataset(
        name="aidx-phantoms",
        description=f"{cases} synthetic chest-CT phantoms (seed {seed}); not patient data",
        root=out,
    )
    jobs = [
        (work / f"phantom-{seed + n}", out, seed + n, slices, matrix, nodules, diameter_range)
        for n in range(cases)
    ]
    if workers > 1 and cases > 1:
        with ProcessPoolExecutor(max_workers=min(workers, cases)) as pool:
            dataset.cases.extend(pool.map(_phantom_case, *zip(*jobs, strict=True)))
    else:
        dataset.cases.extend(_phantom_case(*job) for job in jobs)
    dataset.write(out)
    return dataset


def _phantom_case(
    study: Path,
    out: Path,
    case_seed: int,
    slices: int,
    matrix: int,
    nodules: int | None,
    diameter_range: tuple[float, float],
) -> Case:
    options = PhantomOptions(
        slices=slices,
        matrix=matrix,
        seed=case_seed,
        nodules=nodules,
        diameter_range=diameter_range,
        write_mask=True,
    )
    generate(study, options, overwrite=True)
    return convert_phantom(study, out, f"phantom-{case_seed}")


def convert_phantom(study: Path, out: Path, case_id: str) -> Case:
    """One phantom study folder (dicom/, ground_truth.json, nodule_mask.nii.gz) to a case."""
    study = Path(study)
    truth = json.loads((study / "ground_truth.json").read_text(encoding="utf-8"))
    volume = load_series(sorted((study / "dicom").glob("*.dcm")))
    mask_name = truth.get("files", {}).get("mask")
    if not mask_name:
        raise DatasetError(f"case {case_id!r}: the phantom at {study} has no nodule mask")
    mask, mask_affine = _read_nifti_lps(study / mask_name)
    mask_xyz, mask_aff = canonical(mask, mask_affine)
    image_xyz, image_aff = canonical(volume.hu, volume.affine)
    if mask_xyz.shape != image_xyz.shape or not np.allclose(mask_aff, image_aff, atol=1e-3):
        raise DatasetError(f"case {case_id!r}: field 'label': mask grid differs from the series")
    lesions = [
        Lesion(
            (float(n["center_mm"][0]), float(n["center_mm"][1]), float(n["center_mm"][2])),
            float(n["diameter_mm"]),
        )
        for n in truth["nodules"]
    ]
    source = {
        "kind": "phantom",
        "seed": truth.get("seed"),
        "study_instance_uid": volume.study_uid,
        "series_instance_uid": volume.series_uid,
        "ground_truth": _relative(study / "ground_truth.json", Path(out)),
    }
    return write_case(
        out, case_id, image_xyz, image_aff, label=mask_xyz, lesions=lesions, source=source
    )


def _relative(path: Path, root: Path) -> str:
    """``path`` relative to the dataset folder when inside it (the dataset can move)."""
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(path.resolve())


def main_phantoms(
    out: Path,
    cases: int,
    seed: int,
    slices: int,
    matrix: int,
    nodules: int | None = None,
    diameter_range: tuple[float, float] = (3.0, 30.0),
    workers: int = 1,
) -> Path:
    """``aidx dataset phantoms OUT --cases N --seed S``: returns the dataset.json path."""
    phantom_dataset(
        Path(out),
        cases,
        seed,
        slices=slices,
        matrix=matrix,
        nodules=nodules,
        diameter_range=diameter_range,
        workers=workers,
    )
    return Path(out) / "dataset.json"


# ------------------------------------------------------------------------------- MSD
def msd_dataset(task_dir: Path, out: Path, name: str | None = None) -> Dataset:
    """Convert a Medical Segmentation Decathlon task folder (dataset.json with "training")."""
    task_dir = Path(task_dir)
    meta_path = task_dir / "dataset.json"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetError(f"{meta_path} not found") from None
    training = meta.get("training") if isinstance(meta, dict) else None
    if not isinstance(training, list):
        raise DatasetError(f"{meta_path}: field 'training' must be a list")
    dataset = Dataset(
        name=name or str(meta.get("name") or task_dir.name),
        description=f"converted from the Medical Segmentation Decathlon folder {task_dir.name}",
        root=Path(out),
    )
    for n, entry in enumerate(training):
        if not isinstance(entry, dict) or "image" not in entry:
            raise DatasetError(f"{meta_path}: training[{n}] needs an 'image'")
        image_path = task_dir / str(entry["image"])
        case_id = _nifti_stem(image_path)
        hu, affine = _read_nifti_lps(image_path)
        label = None
        lesions: list[Lesion] = []
        if entry.get("label"):
            raw_label, label_affine = _read_nifti_lps(task_dir / str(entry["label"]))
            if raw_label.shape != hu.shape or not np.allclose(label_affine, affine, atol=1e-3):
                raise DatasetError(f"case {case_id!r}: field 'label': grid differs from the image")
            label, lesions = components(raw_label > 0, affine)
        source = {
            "kind": "msd",
            "task": task_dir.name,
            "image": str(entry["image"]),
            "label": entry.get("label"),
        }
        dataset.cases.append(
            write_case(out, case_id, hu, affine, label=label, lesions=lesions, source=source)
        )
    dataset.write(out)
    return dataset


def components(
    mask: NDArray[np.bool_], affine_lps: NDArray[np.float64]
) -> tuple[NDArray[np.int32], list[Lesion]]:
    """26-connected components of ``mask`` as lesions (label value i = lesions[i-1]): centroid
    in LPS and equivalent-sphere diameter."""
    labels, count = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    voxel_mm3 = abs(float(np.linalg.det(affine_lps[:3, :3])))
    lesions = []
    for i in range(1, count + 1):
        idx = np.argwhere(labels == i).astype(np.float64)
        centroid = idx.mean(axis=0)
        centre = affine_lps[:3, :3] @ centroid + affine_lps[:3, 3]
        diameter = (6.0 * len(idx) * voxel_mm3 / math.pi) ** (1.0 / 3.0)
        lesions.append(
            Lesion(
                (
                    round(float(centre[0]), 4),
                    round(float(centre[1]), 4),
                    round(float(centre[2]), 4),
                ),
                round(diameter, 3),
            )
        )
    return np.asarray(labels, dtype=np.int32), lesions


def _nifti_stem(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    raise DatasetError(f"{path}: expected a .nii or .nii.gz file")


def _read_nifti_lps(path: Path) -> tuple[NDArray[Any], NDArray[np.float64]]:
    try:
        image: Any = nib.load(path)
    except FileNotFoundError:
        raise DatasetError(f"{path} not found") from None
    data = np.asarray(image.get_fdata(dtype=np.float32))
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DatasetError(f"{path}: expected a 3-D volume, got shape {data.shape}")
    return data, LPS_TO_RAS @ np.asarray(image.affine, dtype=np.float64)


# ---------------------------------------------------------------------------- LUNA16
_MET_TYPES = {
    "MET_CHAR": np.int8,
    "MET_UCHAR": np.uint8,
    "MET_SHORT": np.int16,
    "MET_USHORT": np.uint16,
    "MET_INT": np.int32,
    "MET_UINT": np.uint32,
    "MET_LONG": np.int64,
    "MET_ULONG": np.uint64,
    "MET_FLOAT": np.float32,
    "MET_DOUBLE": np.float64,
}


@dataclass(frozen=True)
class MetaImage:
    """A 3-D MetaImage: ``array[k, j, i]`` (i fastest in the file, along the first axis) and
    the affine from (k, j, i) to ITK physical coordinates (LPS mm):
    ``world = Offset + D @ (spacing * [i, j, k])``, with column a of D = TransformMatrix
    entries 3a..3a+2 (ITK's reading of the matrix)."""

    array: NDArray[Any]
    affine: NDArray[np.float64]
    header: dict[str, str]


def read_metaimage(path: Path) -> MetaImage:
    """Read a 3-D .mhd (+ data file) or .mha; raises DatasetError naming the bad key."""
    path = Path(path)
    blob = path.read_bytes()
    header: dict[str, str] = {}
    offset = 0
    while offset < len(blob):
        end = blob.find(b"\n", offset)
        end = len(blob) if end < 0 else end
        line = blob[offset:end].decode("latin-1").strip()
        offset = end + 1
        if not line:
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise DatasetError(f"{path}: header line {line!r} is not 'Key = Value'")
        header[key.strip()] = value.strip()
        if key.strip() == "ElementDataFile":
            break

    def get(key: str) -> str:
        if key not in header:
            raise DatasetError(f"{path}: header key {key!r} is missing")
        return header[key]

    def numbers(key: str, count: int, default: list[float] | None = None) -> list[float]:
        if key not in header and default is not None:
            return default
        try:
            values = [float(v) for v in get(key).split()]
        except ValueError:
            raise DatasetError(f"{path}: header key {key!r} must hold numbers") from None
        if len(values) != count:
            raise DatasetError(f"{path}: header key {key!r} must hold {count} numbers")
        return values

    if header.get("ObjectType", "Image") != "Image":
        raise DatasetError(f"{path}: ObjectType must be Image, got {header['ObjectType']!r}")
    if int(get("NDims")) != 3:
        raise DatasetError(f"{path}: NDims must be 3, got {header['NDims']}")
    dims = [int(v) for v in numbers("DimSize", 3)]
    spacing = numbers("ElementSpacing", 3, [1.0, 1.0, 1.0])
    origin_key = next((k for k in ("Offset", "Origin", "Position") if k in header), "Offset")
    origin = numbers(origin_key, 3, [0.0, 0.0, 0.0])
    matrix_key = next(
        (k for k in ("TransformMatrix", "Rotation", "Orientation") if k in header),
        "TransformMatrix",
    )
    transform = numbers(matrix_key, 9, [1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0])
    element = get("ElementType")
    if element not in _MET_TYPES:
        raise DatasetError(f"{path}: ElementType {element!r} is not supported")
    big_endian = (
        header.get("BinaryDataByteOrderMSB", header.get("ElementByteOrderMSB", "False")).lower()
        == "true"
    )
    dtype = np.dtype(_MET_TYPES[element]).newbyteorder(">" if big_endian else "<")
    data_file = get("ElementDataFile")
    if data_file == "LOCAL":
        raw = blob[offset:]
    elif data_file.startswith("LIST") or "%" in data_file:
        raise DatasetError(f"{path}: ElementDataFile {data_file!r} (file lists) is not supported")
    else:
        try:
            raw = (path.parent / data_file).read_bytes()
        except FileNotFoundError:
            raise DatasetError(f"{path}: data file {data_file} not found") from None
    if header.get("CompressedData", "False").lower() == "true":
        raw = zlib.decompress(raw)
    expected = int(np.prod(dims)) * dtype.itemsize
    header_skip = int(header.get("HeaderSize", "0"))
    if header_skip > 0:
        raw = raw[header_skip:]
    elif header_skip == -1:
        raw = raw[max(len(raw) - expected, 0) :]
    if len(raw) < expected:
        raise DatasetError(f"{path}: data holds {len(raw)} bytes, DimSize needs {expected}")
    array = np.frombuffer(raw, dtype=dtype, count=int(np.prod(dims)))
    array = array.reshape(dims[::-1]).astype(dtype.newbyteorder("="))
    direction = np.asarray(transform, dtype=np.float64).reshape(3, 3).T
    affine_ijk = np.eye(4)
    affine_ijk[:3, :3] = direction * np.asarray(spacing)
    affine_ijk[:3, 3] = origin
    affine = affine_ijk.copy()
    affine[:3, :3] = affine_ijk[:3, :3][:, ::-1]  # array axes are (k, j, i)
    return MetaImage(array, affine, header)


def luna16_dataset(
    luna_dir: Path,
    annotations: Path,
    out: Path,
    *,
    series: Sequence[str] | None = None,
) -> Dataset:
    """Convert every ``*.mhd`` under ``luna_dir`` (e.g. subset0..9; the file stem is the
    seriesuid) with its rows of ``annotations`` into the canonical dataset. Series without
    annotations become cases without lesions (LUNA16 negatives). ``series`` limits the uids."""
    luna_dir, out = Path(luna_dir), Path(out)
    by_uid: dict[str, list[Lesion]] = {}
    with Path(annotations).open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        needed = {"seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"}
        if reader.fieldnames is None or not needed <= set(reader.fieldnames):
            raise DatasetError(f"{annotations}: columns must include {', '.join(sorted(needed))}")
        for line, row in enumerate(reader, start=2):
            try:
                lesion = Lesion(
                    (float(row["coordX"]), float(row["coordY"]), float(row["coordZ"])),
                    float(row["diameter_mm"]),
                )
            except ValueError:
                raise DatasetError(f"{annotations}: line {line} has a non-numeric value") from None
            by_uid.setdefault(row["seriesuid"], []).append(lesion)
    wanted = set(series) if series is not None else None
    dataset = Dataset(
        name="luna16",
        description=f"converted from LUNA16 ({luna_dir.name}, {Path(annotations).name})",
        root=out,
    )
    for mhd in sorted(luna_dir.rglob("*.mhd")):
        uid = mhd.stem
        if wanted is not None and uid not in wanted:
            continue
        image = read_metaimage(mhd)
        source = {"kind": "luna16", "seriesuid": uid, "file": str(mhd.relative_to(luna_dir))}
        dataset.cases.append(
            write_case(
                out, uid, image.array, image.affine, lesions=by_uid.get(uid, []), source=source
            )
        )
    dataset.write(out)
    return dataset
