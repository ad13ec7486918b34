"""`aidx models`, `infer`, `dataset` and `evaluate`: the model and inference commands.

Training-side modules are imported only inside the commands that need them.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aidx.cli.exit_codes import EXIT_FAILED, EXIT_OK, EXIT_USAGE

if TYPE_CHECKING:
    from aidx.config import AidxConfig

log = logging.getLogger("aidx.cli")


def _registry(config: AidxConfig) -> Any:
    import models
    from models.registry import Registry

    shipped = Path(models.__file__).resolve().parent / "shipped"  # models shipped with aidx
    return Registry(config.models_dir(), (shipped,))


def _models_command(action: Callable[[], int]) -> int:
    from models.registry import ModelError

    try:
        return action()
    except ModelError as exc:
        print(f"aidx models: {exc}", file=sys.stderr)
        return EXIT_FAILED


def models_list(args: argparse.Namespace, config: AidxConfig) -> int:
    del args

    def run() -> int:
        registry = _registry(config)
        entries = registry.entries()
        if not entries:
            print(f"no models registered in {config.models_dir()}")
            return EXIT_OK
        for entry in entries:
            active = registry.active(entry.card.name)
            shadow = registry.shadow(entry.card.name)
            mark = "*" if active is not None and active.ref == entry.ref else " "
            if shadow is not None and shadow.ref == entry.ref:
                mark = "s"
            print(f"{mark} {entry.ref:<32} {entry.card.date}  {entry.card.network}")
        print("(* = active, s = in shadow mode)")
        return EXIT_OK

    return _models_command(run)


def models_show(args: argparse.Namespace, config: AidxConfig) -> int:
    def run() -> int:
        entry = _registry(config).resolve(args.ref, config.models.default)
        print(entry.card.model_dump_json(indent=2))
        print(f"# {entry.onnx_path} (sha256 verified)")
        return EXIT_OK

    return _models_command(run)


def models_register(args: argparse.Namespace, config: AidxConfig) -> int:
    def run() -> int:
        entry = _registry(config).register(args.onnx, args.card)
        print(f"registered {entry.ref} in {entry.folder}")
        return EXIT_OK

    return _models_command(run)


def models_rollback(args: argparse.Namespace, config: AidxConfig) -> int:
    def run() -> int:
        entry = _registry(config).rollback(args.name)
        print(f"rolled back: {entry.ref} is the active version of {args.name}")
        return EXIT_OK

    return _models_command(run)


def infer(args: argparse.Namespace, config: AidxConfig) -> int:
    from inference.pipeline import NotApplicableError, infer_study
    from inference.preprocess import PreprocessError
    from inference.volume import VolumeError
    from models.registry import ModelError

    if args.min_probability is not None and not 0 < args.min_probability < 1:
        print("aidx infer: --min-probability must lie between 0 and 1", file=sys.stderr)
        return EXIT_USAGE
    if not args.input_dir.is_dir():
        print(f"aidx infer: {args.input_dir} is not a folder", file=sys.stderr)
        return EXIT_USAGE
    try:
        model = _registry(config).resolve(args.model, config.models.default)
    except ModelError as exc:
        print(f"aidx infer: {exc}", file=sys.stderr)
        return EXIT_FAILED
    try:
        result = infer_study(
            args.input_dir,
            args.out,
            config,
            model,
            args.min_probability,
            args.key_images,
            kos=args.kos,
            cornerstone_sr=args.cornerstone_sr,
        )
    except NotApplicableError as exc:
        print(f"aidx infer: not applicable: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except (VolumeError, PreprocessError) as exc:
        print(f"aidx infer: the series cannot be read: {exc}", file=sys.stderr)
        return EXIT_FAILED
    findings = result.report.findings
    print(f"{len(findings)} findings by {model.ref} on {result.provider}: {result.findings_path}")
    for f in findings:
        c = ", ".join(f"{v:.1f}" for v in f.center_mm)
        print(f"  #{f.id}: p={f.probability:.3f} {f.diameter_mm:.1f} mm at ({c}) mm")
    print(f"SR: {result.sr_path}" + (f"\nSEG: {result.seg_path}" if result.seg_path else ""))
    if result.key_images:
        print(f"key images: {len(result.key_images)} in {result.key_images[0].parent}")
    if result.kos_path:
        print(f"key object selection: {result.kos_path}")
    if result.cornerstone_sr_path:
        print(f"SR for Cornerstone3D/OHIF: {result.cornerstone_sr_path}")
    steps = ", ".join(f"{k[:-2]} {v:.2f} s" for k, v in result.timings.items())
    print(f"time: {steps}; peak memory {result.peak_rss_mb:.0f} MB")
    return EXIT_OK


def dataset_phantoms(args: argparse.Namespace, config: AidxConfig) -> int:
    del config
    from training.converters import main_phantoms
    from training.dataset import DatasetError
    from training.phantom import PhantomError

    try:
        path = main_phantoms(
            args.out,
            args.cases,
            args.seed,
            args.slices,
            args.matrix,
            nodules=args.nodules,
            diameter_range=(args.min_diameter, args.max_diameter),
            workers=args.workers,
        )
    except (DatasetError, PhantomError) as exc:
        print(f"aidx dataset phantoms: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(f"wrote {args.cases} phantom cases: {path} (synthetic data)")
    return EXIT_OK


def dataset_msd(args: argparse.Namespace, config: AidxConfig) -> int:
    del config
    from training.converters import msd_dataset
    from training.dataset import DatasetError

    try:
        dataset = msd_dataset(args.task_dir, args.out, args.name)
    except (DatasetError, OSError) as exc:
        print(f"aidx dataset msd: {exc}", file=sys.stderr)
        return EXIT_USAGE
    _report_dataset(dataset, args.out)
    return EXIT_OK


def dataset_luna16(args: argparse.Namespace, config: AidxConfig) -> int:
    del config
    from training.converters import luna16_dataset
    from training.dataset import DatasetError

    try:
        dataset = luna16_dataset(args.luna_dir, args.annotations, args.out, series=args.series)
    except (DatasetError, OSError) as exc:
        print(f"aidx dataset luna16: {exc}", file=sys.stderr)
        return EXIT_USAGE
    _report_dataset(dataset, args.out)
    return EXIT_OK


def dataset_dicom_seg(args: argparse.Namespace, config: AidxConfig) -> int:
    del config
    from training.converters_dicom import main_dicom_seg
    from training.dataset import DatasetError

    try:
        dataset = main_dicom_seg(args.in_dir, args.out, all_segments=args.all_segments)
    except (DatasetError, OSError) as exc:
        print(f"aidx dataset dicom-seg: {exc}", file=sys.stderr)
        return EXIT_USAGE
    _report_dataset(dataset, args.out)
    return EXIT_OK


def _report_dataset(dataset: Any, out: Path) -> None:
    lesions = sum(len(case.lesions) for case in dataset.cases)
    labelled = sum(case.label is not None for case in dataset.cases)
    print(
        f"wrote {len(dataset.cases)} cases ({labelled} with label masks, {lesions} lesions): "
        f"{Path(out) / 'dataset.json'}"
    )


def card_evaluation(
    args: argparse.Namespace, command: str
) -> tuple[float, dict[str, float] | None] | None:
    """The operating threshold and card figures from ``--evaluation`` (a froc.json) at
    ``--operating-fp-rate``; (0.5, None) without it; None (after saying why) when unreadable."""
    if args.evaluation is None:
        return 0.5, None
    from training.froc_io import evaluation_figures, operating_point

    try:
        froc = json.loads(args.evaluation.read_text("utf-8"))
        evaluation = evaluation_figures(froc)
        threshold, fp_rate = operating_point(froc, args.operating_fp_rate)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"aidx {command}: {args.evaluation}: not a froc.json: {exc}", file=sys.stderr)
        return None
    evaluation["operating_fp_per_scan"] = fp_rate
    print(f"operating threshold {threshold:.6g}: {fp_rate:g} false positives per scan")
    return threshold, evaluation


def evaluate(args: argparse.Namespace, config: AidxConfig) -> int:
    from inference.pipeline import runner_options
    from models.registry import ModelError
    from training.dataset import DatasetError
    from training.evaluate import evaluate_model
    from training.froc import FrocError

    try:
        model = _registry(config).resolve(args.model, config.models.default)
        result = evaluate_model(
            model,
            args.dataset,
            args.out,
            runner_options(config),
            min_volume_mm3=config.inference.min_volume_mm3,
            merge_distance_mm=config.inference.merge_distance_mm,
            bootstrap=args.bootstrap,
        )
    except (ModelError, DatasetError, FrocError) as exc:
        print(f"aidx evaluate: {exc}", file=sys.stderr)
        return EXIT_FAILED
    report = result.report
    points = ", ".join(
        f"{fp:g}: {s:.3f}"
        for fp, s in zip(report.operating_points, report.sensitivities, strict=True)
    )
    print(f"{model.ref} on {args.dataset}: CPM {report.cpm:.3f}")
    print(f"  sensitivity at FP/scan {points}")
    print(f"  report: {result.json_path}; curve: {result.png_path}")
    return EXIT_OK


def compare(args: argparse.Namespace, config: AidxConfig) -> int:
    """`aidx compare A B --dataset DIR`: two evaluations, paired bootstrap of the CPM gain."""
    del config
    from training.dataset import DatasetError
    from training.evaluate import compare_evaluations
    from training.froc import FrocError

    try:
        result = compare_evaluations(args.dataset, args.a, args.b, bootstrap=args.bootstrap)
    except (DatasetError, FrocError) as exc:
        print(f"aidx compare: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(f"{result.n_scans} scans, {result.n_nodules} nodules ({args.dataset})")
    for name, folder, cpm, sens in (
        ("A", args.a, result.cpm_a, result.sensitivities_a),
        ("B", args.b, result.cpm_b, result.sensitivities_b),
    ):
        points = " ".join(f"{s:.3f}" for s in sens)
        print(f"  {name} {folder}: CPM {cpm:.3f}  (sensitivity at 1/8..8 FP/scan: {points})")
    lo, hi = result.difference_ci
    print(
        f"  B - A: {result.difference:+.3f}, {result.confidence:.0%} paired bootstrap "
        f"{lo:+.3f} to {hi:+.3f}; B better in {result.b_better_fraction:.1%} of "
        f"{result.bootstrap_samples} resamples"
    )
    if args.out is not None:
        args.out.write_text(json.dumps(result.to_json(), indent=2) + "\n", encoding="utf-8")
        print(f"  written: {args.out}")
    return EXIT_OK


def calibrate(args: argparse.Namespace, config: AidxConfig) -> int:
    """`aidx calibrate`: fit the calibration, register NAME@VERSION with the same ONNX file."""
    import json
    import shutil

    from inference.pipeline import runner_options
    from models.registry import ModelCard, ModelError
    from training.calibrate import CalibrationError
    from training.calibrate import calibrate as fit_calibration
    from training.dataset import DatasetError

    read = card_evaluation(args, "calibrate")
    if read is None:
        return EXIT_USAGE
    threshold, evaluation = read[0], read[1] or {}
    try:
        source = _registry(config).resolve(args.model, config.models.default)
        calibration, samples = fit_calibration(
            source,
            args.dataset,
            runner_options(config),
            args.segmentation_threshold,
            config.inference.min_volume_mm3,
            config.inference.merge_distance_mm,
        )
    except (ModelError, DatasetError, CalibrationError, ValueError) as exc:
        print(f"aidx calibrate: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(
        f"calibration of {source.ref}: p = sigmoid({calibration.intercept:.3f} + "
        f"{calibration.volume_coef:.3f} ln(1 + volume mm3) + {calibration.max_coef:.3f} "
        f"logit(max)); {calibration.fitted_on}"
    )
    card = source.card
    command = (
        f"aidx calibrate --model {source.ref} --dataset {args.dataset} --version {args.version}"
        f" --segmentation-threshold {args.segmentation_threshold:g}"
    )
    calibrated = ModelCard.model_validate(
        {
            **json.loads(card.model_dump_json()),
            "version": args.version,
            "output": {
                **json.loads(card.output.model_dump_json()),
                "operating_threshold": threshold,
                "calibration": json.loads(calibration.model_dump_json()),
            },
            "training": {
                **json.loads(card.training.model_dump_json()),
                "command": f"{card.training.command}; then {command}",
            },
            "evaluation": evaluation,
        }
    )
    out = config.data_dir / "exports" / f"{card.name}-{args.version}"
    try:
        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source.onnx_path, out / "model.onnx")
        (out / "card.json").write_text(calibrated.model_dump_json(indent=2) + "\n", "utf-8")
        entry = _registry(config).register(out / "model.onnx", out / "card.json")
    except (ModelError, OSError) as exc:
        print(f"aidx calibrate: {exc}", file=sys.stderr)
        return EXIT_FAILED
    nodules = int(samples.is_nodule.sum())
    print(f"{len(samples.is_nodule)} components ({nodules} on nodules) in {samples.cases} cases")
    print(f"registered {entry.ref}; evaluate it, then promote: aidx models promote {entry.ref}")
    return EXIT_OK


def train(args: argparse.Namespace, config: AidxConfig) -> int:
    del config
    try:
        from training.train import main as train_main
    except ImportError as exc:
        print(
            f"aidx train: needs the training extra (pip install 'aidx[train]'): {exc}",
            file=sys.stderr,
        )
        return EXIT_USAGE
    argv = ["--config", str(args.train_config)] + (["--resume"] if args.resume else [])
    try:
        return train_main(argv)
    except ValueError as exc:
        print(f"aidx train: {exc}", file=sys.stderr)
        return EXIT_USAGE


def export(args: argparse.Namespace, config: AidxConfig) -> int:

    from models.registry import ModelError

    try:
        from training.export import ExportError, export_checkpoint
    except ImportError as exc:
        print(
            f"aidx export: needs the training extra (pip install 'aidx[train]'): {exc}",
            file=sys.stderr,
        )
        return EXIT_USAGE
    read = card_evaluation(args, "export")
    if read is None:
        return EXIT_USAGE
    threshold, evaluation = read
    out = config.data_dir / "exports" / f"{args.name}-{args.version}"
    try:
        onnx_path, card_path, checked = export_checkpoint(
            args.checkpoint,
            args.name,
            args.version,
            out,
            evaluation,
            command=" ".join(["aidx", *sys.argv[1:]]),
            operating_threshold=threshold,
        )
        entry = _registry(config).register(onnx_path, card_path)
    except (ExportError, ModelError, OSError, KeyError) as exc:
        print(f"aidx export: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(f"exported and verified: {checked.summary()}")
    print(f"registered {entry.ref}; make it active with `aidx models promote {entry.ref}`")
    return EXIT_OK
