"""Plans and writes a synthetic chest-CT study: DICOM series, ground truth and optional mask."""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import date
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from pydicom.uid import generate_uid

from .anatomy import Anatomy
from .dicom_writer import SeriesHeader, SeriesWriter, hu_to_stored, resolve_charset
from .errors import PhantomError
from .nodules import Nodule, NoduleRequest, sample_nodules
from .render import KERNELS, Grid, Scene, render_slab
from .vessels import build_trees

GROUND_TRUTH_FORMAT = "aidx-phantom-ground-truth/1"
CLINICAL_THICKNESSES = (0.625, 0.75, 0.8, 1.0, 1.25, 1.5, 2.0, 2.5)
PIXEL_SPACING_RANGE = (0.6, 0.9)  # mm, for a 512 matrix
SLAB = 12  # slices rendered per task


@dataclass(frozen=True)
class PhantomOptions:
    """What to generate. None means "choose at random within clinical ranges"."""

    slices: int = 300
    matrix: int = 512
    nodules: int | None = None
    seed: int | None = None
    slice_thickness: float | None = None
    pixel_spacing: float | None = None
    kernel: str | None = None
    nodule_requests: tuple[NoduleRequest, ...] = ()
    diameter_range: tuple[float, float] = (3.0, 30.0)
    patient_name: str = "PHANTOM^CHEST"
    patient_id: str | None = None
    patient_birth_date: str = "19600101"
    patient_sex: str = "O"
    accession_number: str | None = None
    charset: str | None = None
    study_description: str = "CT CHEST (SYNTHETIC PHANTOM)"
    institution_name: str = "aidx synthetic data"
    write_mask: bool = False
    workers: int | None = None

    def validate(self) -> None:
        if not 8 <= self.slices <= 2000:
            raise PhantomError(f"slices must be 8..2000, got {self.slices}")
        if not 64 <= self.matrix <= 1024:
            raise PhantomError(f"matrix must be 64..1024, got {self.matrix}")
        if self.nodules is not None and not 0 <= self.nodules <= 50:
            raise PhantomError(f"nodules must be 0..50, got {self.nodules}")
        if self.slice_thickness is not None and not 0.5 <= self.slice_thickness <= 5.0:
            raise PhantomError(f"slice thickness must be 0.5..5 mm, got {self.slice_thickness}")
        if self.pixel_spacing is not None and not 0.3 <= self.pixel_spacing <= 2.0:
            raise PhantomError(f"pixel spacing must be 0.3..2 mm, got {self.pixel_spacing}")
        if self.kernel is not None and self.kernel not in KERNELS:
            raise PhantomError(f"kernel must be one of {', '.join(KERNELS)}, got {self.kernel!r}")
        lo, hi = self.diameter_range
        if not 3.0 <= lo <= hi <= 30.0:
            raise PhantomError(f"nodule diameters must lie in 3..30 mm, got {lo}..{hi}")
        if self.patient_sex not in ("M", "F", "O", ""):
            raise PhantomError(f"patient sex must be M, F, O or empty, got {self.patient_sex!r}")
        bd = self.patient_birth_date
        if bd and (len(bd) != 8 or not bd.isdigit()):
            raise PhantomError(f"birth date must be YYYYMMDD, got {bd!r}")


@dataclass(frozen=True)
class Plan:
    """A fully determined phantom: the scene to render and the DICOM identity of every slice."""

    scene: Scene
    header: SeriesHeader
    sop_uids: tuple[str, ...]
    seed: int
    options: PhantomOptions


@dataclass
class PhantomResult:
    out_dir: Path
    dicom_dir: Path
    files: list[Path]
    ground_truth_path: Path
    ground_truth: dict[str, Any]
    mask_path: Path | None
    timings: dict[str, float] = field(default_factory=dict)


def make_plan(options: PhantomOptions) -> Plan:
    """Decide everything (anatomy, geometry, vessels, nodules, UIDs) from the options and seed."""
    options.validate()
    seed = options.seed if options.seed is not None else _fresh_seed()
    rng = np.random.default_rng(seed)
    anatomy = Anatomy.sample(rng, z_apex=float(rng.uniform(-80.0, 40.0)))
    grid = _grid(anatomy, options, rng)
    kernel = KERNELS[options.kernel or str(rng.choice(sorted(KERNELS)))]
    trees = build_trees(anatomy, rng)
    count = options.nodules
    if count is None:
        count = len(options.nodule_requests) or int(
            rng.choice(6, p=[0.15, 0.3, 0.25, 0.15, 0.1, 0.05])
        )
    requests = list(options.nodule_requests[:count])
    requests += [NoduleRequest()] * (count - len(requests))
    z_limits = (float(grid.z.min()), float(grid.z.max()))
    nodules = sample_nodules(
        anatomy, trees.vessels, rng, requests, z_limits, options.diameter_range
    )
    scene = Scene(anatomy, trees, tuple(nodules), grid, kernel, seed)

    identity = json.dumps([seed, _options_key(options)], sort_keys=True)
    uid = _uid_factory(identity)
    patient_id = options.patient_id or f"PH{seed % 10**8:08d}"
    accession = options.accession_number or f"A{seed % 10**9:09d}"
    charset = resolve_charset(
        [
            options.patient_name,
            patient_id,
            accession,
            options.study_description,
            options.institution_name,
        ],
        options.charset,
    )
    study_day = date(2026, 1, 1).toordinal() + int(rng.integers(0, 300))
    header = SeriesHeader(
        patient_name=options.patient_name,
        patient_id=patient_id,
        patient_birth_date=options.patient_birth_date,
        patient_sex=options.patient_sex,
        accession_number=accession,
        charset=charset,
        study_uid=uid("study"),
        series_uid=uid("series"),
        frame_of_reference_uid=uid("frame"),
        study_date=date.fromordinal(study_day).strftime("%Y%m%d"),
        study_time=f"{int(rng.integers(7, 19)):02d}{int(rng.integers(0, 60)):02d}00",
        study_description=options.study_description,
        series_description=f"SYNTHETIC CHEST {kernel.name} {grid.thickness:g}mm",
        institution_name=options.institution_name,
        kernel=kernel.name,
        software_version=_version(),
        pixel_spacing=grid.spacing,
        slice_thickness=grid.thickness,
        rows=grid.rows,
        columns=grid.columns,
        x0=grid.x0,
        y0=grid.y0,
    )
    sop_uids = tuple(uid(f"sop{k}") for k in range(options.slices))
    return Plan(scene, header, sop_uids, seed, options)


def _fresh_seed() -> int:
    entropy = np.random.SeedSequence().entropy
    return int(entropy) % 2**63 if isinstance(entropy, int) else 0


def _grid(anatomy: Anatomy, options: PhantomOptions, rng: np.random.Generator) -> Grid:
    # The field of view fits the body, as a technologist sets it.
    fov = 2.0 * anatomy.body_a + float(rng.uniform(15.0, 50.0))
    spacing_512 = float(np.clip(fov / 512.0, *PIXEL_SPACING_RANGE))
    spacing = options.pixel_spacing or spacing_512 * 512.0 / options.matrix
    thickness = options.slice_thickness or _thickness(anatomy, options.slices, rng)
    n = options.matrix
    x_centre = float(rng.uniform(-8.0, 8.0))
    y_centre = 0.5 * (anatomy.body_b_post - anatomy.body_b_ant) + float(rng.uniform(0.0, 12.0))
    z_centre = anatomy.z_apex - 0.5 * anatomy.lung_height + float(rng.uniform(-10.0, 10.0))
    z_top = z_centre + 0.5 * (options.slices - 1) * thickness
    return Grid(
        x0=round(x_centre - 0.5 * (n - 1) * spacing, 3),
        y0=round(y_centre - 0.5 * (n - 1) * spacing, 3),
        spacing=round(spacing, 6),
        columns=n,
        rows=n,
        z=np.round(z_top - thickness * np.arange(options.slices), 4),
        thickness=thickness,
    )


def _thickness(anatomy: Anatomy, slices: int, rng: np.random.Generator) -> float:
    """A clinical thickness whose coverage comes closest to the chest (lungs plus margins)."""
    target = anatomy.lung_height + float(rng.uniform(20.0, 70.0))
    ranked = sorted(CLINICAL_THICKNESSES, key=lambda t: abs(slices * t - target))
    return float(
        ranked[int(rng.integers(0, 2))] if abs(slices * ranked[1] - target) < 60 else ranked[0]
    )


def _options_key(options: PhantomOptions) -> dict[str, Any]:
    d = asdict(options)
    d.pop("workers")
    d.pop("write_mask")
    return d


def _uid_factory(identity: str) -> Any:
    def uid(name: str) -> str:
        return str(generate_uid(entropy_srcs=[identity, name]))

    return uid


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("aidx")
    except Exception:  # noqa: BLE001 - running from a source tree without installing
        return "0+source"


# --------------------------------------------------------------------------------- writing
_WORKER_STATE: dict[str, Any] = {}


def _init_worker(plan: Plan, dicom_dir: Path, with_labels: bool) -> None:
    _WORKER_STATE["plan"] = plan
    _WORKER_STATE["writer"] = SeriesWriter(plan.header, dicom_dir)
    _WORKER_STATE["labels"] = with_labels


def _write_slab(k0: int, k1: int) -> tuple[int, list[str], NDArray[np.uint8] | None]:
    plan: Plan = _WORKER_STATE["plan"]
    writer: SeriesWriter = _WORKER_STATE["writer"]
    hu, labels = render_slab(plan.scene, k0, k1, _WORKER_STATE["labels"])
    paths = []
    for i, k in enumerate(range(k0, k1)):
        path = writer.write(
            k + 1, plan.sop_uids[k], float(plan.scene.grid.z[k]), hu_to_stored(hu[i])
        )
        paths.append(str(path))
    return k0, paths, labels


def generate(out_dir: Path, options: PhantomOptions, overwrite: bool = False) -> PhantomResult:
    """Write the phantom study into ``out_dir`` (``dicom/``, ``ground_truth.json``, mask)."""
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    dicom_dir = out_dir / "dicom"
    _prepare(out_dir, dicom_dir, overwrite)
    plan = make_plan(options)
    t_plan = time.perf_counter()

    n = options.slices
    slabs = [(k, min(k + SLAB, n)) for k in range(0, n, SLAB)]
    workers = options.workers or min(os.cpu_count() or 1, len(slabs), 8)
    labels = (
        np.zeros((n, plan.header.rows, plan.header.columns), np.uint8)
        if options.write_mask
        else None
    )
    files: list[str] = [""] * n
    if workers <= 1:
        _init_worker(plan, dicom_dir, options.write_mask)
        results = [_write_slab(k0, k1) for k0, k1 in slabs]
    else:
        with ProcessPoolExecutor(
            max_workers=workers,
            mp_context=get_context("fork"),
            initializer=_init_worker,
            initargs=(plan, dicom_dir, options.write_mask),
        ) as pool:
            results = list(pool.map(_write_slab, *zip(*slabs, strict=True)))
    for k0, paths, slab_labels in results:
        files[k0 : k0 + len(paths)] = paths
        if labels is not None and slab_labels is not None:
            labels[k0 : k0 + len(slab_labels)] = slab_labels
    t_write = time.perf_counter()

    mask_path = _write_mask(out_dir, plan, labels) if labels is not None else None
    truth = ground_truth(plan, mask_path)
    truth_path = out_dir / "ground_truth.json"
    truth_path.write_text(json.dumps(truth, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    t_end = time.perf_counter()
    return PhantomResult(
        out_dir=out_dir,
        dicom_dir=dicom_dir,
        files=[Path(f) for f in files],
        ground_truth_path=truth_path,
        ground_truth=truth,
        mask_path=mask_path,
        timings={
            "plan_s": t_plan - t0,
            "render_write_s": t_write - t_plan,
            "finish_s": t_end - t_write,
            "total_s": t_end - t0,
            "workers": float(workers),
        },
    )


def _prepare(out_dir: Path, dicom_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise PhantomError(f"{out_dir} exists and is not a folder")
    existing = [p for p in (dicom_dir, out_dir / "ground_truth.json") if p.exists()]
    if existing and not overwrite:
        raise PhantomError(
            f"{out_dir} already holds a phantom; choose an empty folder or pass --overwrite"
        )
    if dicom_dir.exists():
        for old in dicom_dir.glob("CT*.dcm"):
            old.unlink()
    dicom_dir.mkdir(parents=True, exist_ok=True)


def nodule_record(index: int, nodule: Nodule, plan: Plan) -> dict[str, Any]:
    grid = plan.scene.grid
    k, _, _ = grid.pixel_index(nodule.center)
    return {
        "id": index,
        "center_mm": [round(float(v), 3) for v in nodule.center],
        "diameter_mm": round(nodule.diameter_mm, 2),
        "volume_mm3": round(nodule.volume_mm3, 1),
        "type": nodule.density,
        "location": nodule.location,
        "margin": nodule.margin,
        "hu": round(nodule.outer_hu, 1),
        "core_hu": round(nodule.core_hu, 1) if nodule.core else None,
        "key_slice_instance_number": k + 1,
        "key_slice_sop_instance_uid": plan.sop_uids[k],
    }


def ground_truth(plan: Plan, mask_path: Path | None) -> dict[str, Any]:
    h, grid = plan.header, plan.scene.grid
    return {
        "format": GROUND_TRUTH_FORMAT,
        "synthetic": True,
        "note": "Synthetic phantom generated by aidx; not patient data.",
        "generator": {"name": "aidx phantom", "version": h.software_version},
        "seed": plan.seed,
        "coordinates": "DICOM patient coordinates (LPS), millimetres",
        "study_instance_uid": h.study_uid,
        "series_instance_uid": h.series_uid,
        "frame_of_reference_uid": h.frame_of_reference_uid,
        "geometry": {
            "rows": grid.rows,
            "columns": grid.columns,
            "slices": int(grid.z.size),
            "pixel_spacing_mm": [grid.spacing, grid.spacing],
            "slice_thickness_mm": grid.thickness,
            "spacing_between_slices_mm": grid.thickness,
            "image_orientation_patient": [1, 0, 0, 0, 1, 0],
            "first_image_position_mm": [grid.x0, grid.y0, float(grid.z[0])],
            "kernel": plan.scene.kernel.name,
        },
        "nodules": [nodule_record(i, n, plan) for i, n in enumerate(plan.scene.nodules, start=1)],
        "files": {
            "dicom_dir": "dicom",
            "mask": mask_path.name if mask_path else None,
            "mask_labels": "0 background, i = nodules[i-1]" if mask_path else None,
        },
    }


def _write_mask(out_dir: Path, plan: Plan, labels: NDArray[np.uint8]) -> Path:
    """Nodule label volume as NIfTI (RAS affine, as NIfTI tools expect)."""
    import nibabel as nib

    grid = plan.scene.grid
    s, t = grid.spacing, grid.thickness
    # Array axes (column, row, slice) -> LPS (x0 + s*i, y0 + s*j, z0 - t*k) -> RAS.
    affine = np.array(
        [
            [-s, 0.0, 0.0, -grid.x0],
            [0.0, -s, 0.0, -grid.y0],
            [0.0, 0.0, -t, float(grid.z[0])],
            [0.0, 0.0, 0.0, 1.0],
        ]
    )
    data = np.ascontiguousarray(labels.transpose(2, 1, 0))
    image = nib.Nifti1Image(data, affine)  # type: ignore[no-untyped-call]
    image.header.set_xyzt_units("mm")  # type: ignore[no-untyped-call]
    path = out_dir / "nodule_mask.nii.gz"
    nib.save(image, path)
    return path
