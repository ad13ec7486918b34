"""`aidx phantom` and `aidx demo`: a synthetic chest CT study (DICOM series and ground truth).

The generator (:mod:`training.phantom`, torch-free) is imported only when a command runs.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aidx.cli.exit_codes import EXIT_OK, EXIT_USAGE

if TYPE_CHECKING:
    from aidx.config import AidxConfig

log = logging.getLogger("aidx.cli")


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    phantom = sub.add_parser(
        "phantom",
        help="write a synthetic chest CT study (DICOM series + ground truth)",
        description="Write a synthetic chest CT as a DICOM series in OUT_DIR/dicom, with "
        "OUT_DIR/ground_truth.json listing every nodule (centre in patient mm, LPS). "
        "Synthetic data: not for clinical use.",
    )
    _phantom_arguments(phantom)
    phantom.set_defaults(handler=write_phantom)

    demo = sub.add_parser(
        "demo", help="write the demo study configured under 'demo' (what `make run` does)"
    )
    demo.set_defaults(handler=write_demo)


def _phantom_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("out_dir", type=Path, metavar="OUT_DIR")
    p.add_argument("--seed", type=int, help="random seed: the same seed gives the same study")
    p.add_argument("--nodules", type=int, help="number of nodules (default: random, 0-5)")
    p.add_argument("--slices", type=int, default=300, help="number of slices (default 300)")
    p.add_argument("--matrix", type=int, default=512, help="rows and columns (default 512)")
    p.add_argument("--slice-thickness", type=float, help="mm (default: clinical, by coverage)")
    p.add_argument("--pixel-spacing", type=float, help="mm (default: fits the body, 0.6-0.9)")
    p.add_argument("--kernel", choices=["STANDARD", "LUNG"], help="reconstruction kernel")
    p.add_argument("--min-diameter", type=float, default=3.0, help="smallest nodule, mm")
    p.add_argument("--max-diameter", type=float, default=30.0, help="largest nodule, mm")
    p.add_argument("--patient-name", default="PHANTOM^CHEST", help="DICOM PN, e.g. 王^小明")
    p.add_argument("--patient-id", help="default: derived from the seed")
    p.add_argument("--accession", help="accession number (default: derived from the seed)")
    p.add_argument("--birth-date", default="19600101", help="YYYYMMDD")
    p.add_argument("--sex", default="O", choices=["M", "F", "O"])
    p.add_argument(
        "--charset",
        choices=["ISO_IR 6", "ISO_IR 100", "ISO_IR 192", "GB18030"],
        help="Specific Character Set (default: Latin-1 when it fits, else UTF-8)",
    )
    p.add_argument("--mask", action="store_true", help="also write nodule_mask.nii.gz")
    p.add_argument("--overwrite", action="store_true", help="replace a phantom in OUT_DIR")
    p.add_argument("--workers", type=int, help="processes (default: one per core)")


def write_phantom(args: argparse.Namespace, config: AidxConfig) -> int:
    del config
    from training.phantom import PhantomError, PhantomOptions, generate

    try:
        options = PhantomOptions(
            slices=args.slices,
            matrix=args.matrix,
            nodules=args.nodules,
            seed=args.seed,
            slice_thickness=args.slice_thickness,
            pixel_spacing=args.pixel_spacing,
            kernel=args.kernel,
            diameter_range=(args.min_diameter, args.max_diameter),
            patient_name=args.patient_name,
            patient_id=args.patient_id,
            patient_birth_date=args.birth_date,
            patient_sex=args.sex,
            accession_number=args.accession,
            charset=args.charset,
            write_mask=args.mask,
            workers=args.workers,
        )
        result = generate(args.out_dir, options, overwrite=args.overwrite)
    except PhantomError as exc:
        print(f"aidx phantom: {exc}", file=sys.stderr)
        return EXIT_USAGE
    _report_phantom(result)
    return EXIT_OK


def write_demo(args: argparse.Namespace, config: AidxConfig) -> int:
    del args
    from aidx.demo import write_demo_study
    from training.phantom import PhantomError

    try:
        result = write_demo_study(config, overwrite=True)
    except PhantomError as exc:
        print(f"aidx demo: {exc}", file=sys.stderr)
        return EXIT_USAGE
    _report_phantom(result)
    dicom_dir = result.dicom_dir
    print(
        "\nThis is synthetic data (not for clinical use). Look at it with any DICOM viewer, or "
        f"send it to a PACS with DCMTK:\n  storescu +sd +sp '*.dcm' HOST PORT {dicom_dir}"
        "\nor run everything on it: aidx serve --demo"
    )
    return EXIT_OK


def _report_phantom(result: Any) -> None:
    truth = result.ground_truth
    geometry = truth["geometry"]
    print(f"wrote {len(result.files)} CT slices to {result.dicom_dir}")
    print(
        f"  {geometry['columns']}x{geometry['rows']}, pixel spacing "
        f"{geometry['pixel_spacing_mm'][0]:.3f} mm, slice thickness "
        f"{geometry['slice_thickness_mm']} mm, kernel {geometry['kernel']}"
    )
    print(f"  study {truth['study_instance_uid']}")
    print(f"  series {truth['series_instance_uid']}")
    print(f"ground truth: {result.ground_truth_path} ({len(truth['nodules'])} nodules)")
    for n in truth["nodules"]:
        c = ", ".join(f"{v:.1f}" for v in n["center_mm"])
        print(
            f"  #{n['id']}: {n['diameter_mm']:.1f} mm {n['type']} {n['margin']} "
            f"{n['location']} at ({c}) mm, image {n['key_slice_instance_number']}"
        )
    if result.mask_path:
        print(f"nodule mask: {result.mask_path}")
    log.info(
        "phantom written",
        extra={"study_uid": truth["study_instance_uid"], "seconds": result.timings["total_s"]},
    )
