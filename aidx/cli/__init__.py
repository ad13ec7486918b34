"""The ``aidx`` command: one sub-command per job, each a thin wrapper over a library call.

This module builds the parser, takes the global options and runs :func:`main`; the commands
live in one module per group (:mod:`aidx.cli.config`, ``db``, ``export`` (export-study),
``feedback``, ``models``, ``node``, ``pipeline`` (serve), ``worker``, ``phantom`` (phantom, demo),
``protect`` (backup, restore, verify, purge), ``status``, ``ui``, ``users``).
Nothing below the command line imports this package.

Commands that belong to the training side (``phantom``) import it only when they run, so the
serving commands never load training code, torch or MONAI.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aidx import __version__
from aidx.cli import config as cli_config
from aidx.cli import db as cli_db
from aidx.cli import dicomweb as cli_dicomweb
from aidx.cli import models as cli_models
from aidx.cli import node as cli_node
from aidx.cli import phantom as cli_phantom
from aidx.cli import pipeline as cli_pipeline
from aidx.cli import promotion as cli_promotion
from aidx.cli import protect as cli_protect
from aidx.cli import status as cli_status
from aidx.cli import ui as cli_ui
from aidx.cli import worker as cli_worker
from aidx.cli.exit_codes import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from aidx.keys import secret_problems
from aidx.logs import setup_logging
from aidx.permissions import private_umask, sqlite_path, tighten_data_dir
from aidx.supervisor import as_supervised_child

__all__ = ["EXIT_FAILED", "EXIT_OK", "EXIT_USAGE", "build_parser", "main"]

if TYPE_CHECKING:
    from aidx.config import AidxConfig

    Handler = Callable[[argparse.Namespace, AidxConfig], int]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aidx",
        description="AI imaging diagnostic assistant: DICOM node, ONNX inference, review app.",
    )
    parser.add_argument("--version", action="version", version=f"aidx {__version__}")
    _global_options(parser, default=None)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    cli_config.add_parsers(sub)
    cli_dicomweb.add_parsers(sub)
    cli_phantom.add_parsers(sub)

    serve = sub.add_parser(
        "serve", help="run aidx: DICOM node, study assembly, inference workers, outbox, metrics"
    )
    serve.add_argument("--ae-title", help="override node.ae_title")
    serve.add_argument("--host", help="override node.host (address to listen on)")
    serve.add_argument("--port", type=int, help="override node.port")
    serve.add_argument("--workers", type=int, help="override pipeline.workers")
    serve.add_argument(
        "--metrics-port", type=int, help="override metrics.port (0 turns /metrics off)"
    )
    serve.add_argument("--ui-port", type=int, help="override ui.port (the review app)")
    serve.add_argument(
        "--no-ui", action="store_true", help="do not start the review app (ui.enabled false)"
    )
    serve.add_argument(
        "--demo",
        action="store_true",
        help="also write the demo study and send it to this node (what `make run` does)",
    )
    serve.add_argument(
        "--single-process",
        action="store_true",
        help="run the node, workers, outbox and review app in this one process (default: a "
        "process each, supervised)",
    )
    serve.add_argument(
        "--no-outbox",
        action="store_true",
        help="with --single-process: leave the outbox to `aidx outbox run` (as under the "
        "supervisor)",
    )
    serve.set_defaults(handler=cli_pipeline.serve)

    worker = sub.add_parser(
        "worker", help="run inference workers apart from `aidx serve`, on the same store"
    )
    worker.add_argument("--workers", type=int, help="override pipeline.workers")
    worker.add_argument(
        "--queue",
        action="append",
        metavar="Q",
        help="with pipeline.queue celery: consume this queue (repeatable; default "
        "pipeline.celery.queue)",
    )
    worker.set_defaults(handler=cli_worker.worker)

    echo = sub.add_parser("echo", help="C-ECHO a destination, or this node by default")
    echo.add_argument("destination", nargs="?", help="name under 'destinations' (default: node)")
    echo.set_defaults(handler=cli_node.echo)

    send = sub.add_parser("send", help="C-STORE files or folders to a destination")
    send.add_argument("paths", nargs="+", type=Path, metavar="PATH")
    send.add_argument("--to", required=True, dest="destination", help="name under 'destinations'")
    send.add_argument(
        "--queue", action="store_true", help="queue in the outbox for `aidx serve` to deliver"
    )
    send.set_defaults(handler=cli_node.send)

    outbox = sub.add_parser("outbox", help="deliver, list or retry queued exports")
    outbox_sub = outbox.add_subparsers(dest="outbox_command", metavar="ACTION", required=True)
    run = outbox_sub.add_parser(
        "run", help="deliver queued exports until stopped (a process of `aidx serve`)"
    )
    run.set_defaults(handler=cli_node.outbox_run)
    listing = outbox_sub.add_parser("list", help="show queued, sent and failed exports")
    listing.add_argument("--state", choices=["pending", "sending", "sent", "failed"])
    listing.set_defaults(handler=cli_node.outbox_list)
    retry = outbox_sub.add_parser("retry", help="queue failed exports again")
    retry.add_argument("ids", nargs="*", type=int, metavar="ID", help="default: all failed")
    retry.set_defaults(handler=cli_node.outbox_retry)

    status = sub.add_parser(
        "status", help="recent studies, or one study's timeline, results and deliveries"
    )
    status.add_argument("study_uid", nargs="?", metavar="STUDY_UID", help="default: list studies")
    status.add_argument("--json", action="store_true", help="print the same data as JSON")
    status.add_argument("--limit", type=int, default=20, help="studies to list (default 20)")
    status.set_defaults(handler=cli_status.status)

    infer = sub.add_parser(
        "infer", help="detect nodules in a study folder: findings.json, sr.dcm and seg.dcm"
    )
    infer.add_argument("input_dir", type=Path, metavar="INPUT_DIR")
    infer.add_argument("--out", type=Path, required=True, metavar="OUT_DIR")
    infer.add_argument("--model", metavar="NAME@VERSION", help="default: the active default model")
    infer.add_argument(
        "--min-probability",
        type=float,
        help="report findings down to this probability (default: the card's threshold)",
    )
    infer.add_argument(
        "--key-images",
        action="store_true",
        help="also write a Secondary Capture per finding (key slice, outline burned in)",
    )
    infer.add_argument(
        "--kos",
        action="store_true",
        help="also write the key slices as a Key Object Selection document (kos.dcm)",
    )
    infer.add_argument(
        "--cornerstone-sr",
        action="store_true",
        help="also write the SR variant that OHIF/Cornerstone3D open as editable measurements "
        "(sr-cornerstone.dcm; docs/results.md)",
    )
    infer.set_defaults(handler=cli_models.infer)

    # `aidx users` and `aidx audit`: the review app's accounts
    from aidx.cli import users as cli_users

    cli_users.add_parsers(sub)
    # `aidx feedback export`: reviews as training data
    from aidx.cli import feedback as cli_feedback

    cli_feedback.add_parsers(sub)
    # `aidx export-study`: a study with its results, as received or de-identified
    from aidx.cli import export as cli_export

    cli_export.add_parsers(sub)
    cli_ui.add_parser(sub)
    cli_db.add_parsers(sub)
    cli_protect.add_parsers(sub)

    dataset = sub.add_parser("dataset", help="build training datasets in the canonical format")
    dataset_sub = dataset.add_subparsers(dest="dataset_command", metavar="SOURCE", required=True)
    phantoms = dataset_sub.add_parser("phantoms", help="N synthetic phantom cases")
    phantoms.add_argument("out", type=Path, metavar="OUT")
    phantoms.add_argument("--cases", type=int, required=True)
    phantoms.add_argument("--seed", type=int, default=0)
    phantoms.add_argument("--slices", type=int, default=96)
    phantoms.add_argument("--matrix", type=int, default=256)
    phantoms.add_argument(
        "--nodules", type=int, help="nodules per case (default: the generator's random count)"
    )
    phantoms.add_argument("--min-diameter", type=float, default=3.0, help="mm (default 3)")
    phantoms.add_argument("--max-diameter", type=float, default=30.0, help="mm (default 30)")
    phantoms.add_argument(
        "--workers", type=int, default=1, help="processes generating cases (default 1)"
    )
    phantoms.set_defaults(handler=cli_models.dataset_phantoms)
    msd = dataset_sub.add_parser(
        "msd", help="a Medical Segmentation Decathlon task folder (e.g. Task06_Lung)"
    )
    msd.add_argument("task_dir", type=Path, metavar="TASK_DIR", help="holds dataset.json")
    msd.add_argument("out", type=Path, metavar="OUT")
    msd.add_argument("--name", help="dataset name (default: the task's)")
    msd.set_defaults(handler=cli_models.dataset_msd)
    luna16 = dataset_sub.add_parser("luna16", help="LUNA16 MetaImage volumes and annotations.csv")
    luna16.add_argument("luna_dir", type=Path, metavar="LUNA_DIR", help="searched for *.mhd")
    luna16.add_argument("out", type=Path, metavar="OUT")
    luna16.add_argument(
        "--annotations", type=Path, required=True, metavar="CSV", help="LUNA16 annotations.csv"
    )
    luna16.add_argument(
        "--series", nargs="+", metavar="UID", help="convert only these seriesuids (default: all)"
    )
    luna16.set_defaults(handler=cli_models.dataset_luna16)
    dicom_seg = dataset_sub.add_parser(
        "dicom-seg", help="CT series with DICOM SEG lesion masks (a folder, searched recursively)"
    )
    dicom_seg.add_argument("in_dir", type=Path, metavar="IN_DIR")
    dicom_seg.add_argument("out", type=Path, metavar="OUT")
    dicom_seg.add_argument(
        "--all-segments",
        action="store_true",
        help="take every segment as lesion (default: only nodule/lesion/mass segments)",
    )
    dicom_seg.set_defaults(handler=cli_models.dataset_dicom_seg)

    evaluate = sub.add_parser(
        "evaluate", help="FROC of a model on a dataset, through the serving path (ONNX)"
    )
    evaluate.add_argument("--model", metavar="NAME@VERSION", help="default: the active model")
    evaluate.add_argument("--dataset", type=Path, required=True, metavar="DIR")
    evaluate.add_argument("--out", type=Path, required=True, metavar="OUT_DIR")
    evaluate.add_argument("--bootstrap", type=int, default=100, help="0 disables the CPM CI")
    evaluate.set_defaults(handler=cli_models.evaluate)
    compare = sub.add_parser(
        "compare",
        help="compare two evaluations of one dataset (paired bootstrap of the CPM difference)",
    )
    compare.add_argument("a", type=Path, metavar="EVAL_A", help="an `aidx evaluate --out` folder")
    compare.add_argument("b", type=Path, metavar="EVAL_B", help="the other one")
    compare.add_argument("--dataset", type=Path, required=True, metavar="DIR")
    compare.add_argument("--bootstrap", type=int, default=1000, help="resamples (default 1000)")
    compare.add_argument("--out", type=Path, help="also write the comparison as JSON")
    compare.set_defaults(handler=cli_models.compare)

    calibrate = sub.add_parser(
        "calibrate",
        help="fit a model's finding probabilities on held-apart cases; registers a new version",
    )
    calibrate.add_argument("--model", metavar="NAME@VERSION", help="default: the active model")
    calibrate.add_argument(
        "--dataset",
        type=Path,
        required=True,
        metavar="DIR",
        help="canonical dataset that neither training nor the evaluation uses",
    )
    calibrate.add_argument("--version", required=True, help="version of the calibrated model")
    calibrate.add_argument(
        "--segmentation-threshold",
        type=float,
        default=0.5,
        help="voxel probability that outlines a finding (default 0.5)",
    )
    calibrate.add_argument(
        "--evaluation", type=Path, help="froc.json of the calibrated model to put in its card"
    )
    calibrate.add_argument(
        "--operating-fp-rate",
        type=float,
        default=1.0,
        help="with --evaluation: the threshold at this many false positives per scan",
    )
    calibrate.set_defaults(handler=cli_models.calibrate)

    train_cmd = sub.add_parser("train", help="train a detector (needs the [train] extra)")
    # Its own dest: the global --config names the aidx configuration, not the training one.
    train_cmd.add_argument(
        "--config", dest="train_config", type=Path, required=True, metavar="configs/train/X.yaml"
    )
    train_cmd.add_argument("--resume", action="store_true")
    train_cmd.set_defaults(handler=cli_models.train)

    export_cmd = sub.add_parser(
        "export", help="export a checkpoint to ONNX (verified), write its card and register it"
    )
    export_cmd.add_argument("checkpoint", type=Path, metavar="CHECKPOINT")
    export_cmd.add_argument("--name", required=True)
    export_cmd.add_argument("--version", required=True)
    export_cmd.add_argument("--evaluation", type=Path, help="froc.json to put in the card")
    export_cmd.add_argument(
        "--operating-fp-rate",
        type=float,
        default=1.0,
        help="with --evaluation: the card's threshold is the FROC point with at most this many "
        "false positives per scan (default 1)",
    )
    export_cmd.set_defaults(handler=cli_models.export)

    models = sub.add_parser(
        "models", help="list, show, register, shadow, report on, promote or roll back models"
    )
    models_sub = models.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    models_sub.add_parser("list", help="registered models and their active versions").set_defaults(
        handler=cli_models.models_list
    )
    show_model = models_sub.add_parser("show", help="print a model card (default: active model)")
    show_model.add_argument("ref", nargs="?", metavar="NAME[@VERSION]")
    show_model.set_defaults(handler=cli_models.models_show)
    register = models_sub.add_parser("register", help="add an ONNX model with its card")
    register.add_argument("onnx", type=Path, metavar="MODEL.onnx")
    register.add_argument("--card", type=Path, required=True, metavar="CARD.json")
    register.set_defaults(handler=cli_models.models_register)
    cli_promotion.add_commands(models_sub)  # shadow, report, gate-evaluate, promote
    rollback = models_sub.add_parser("rollback", help="go back to the previously active version")
    rollback.add_argument("name", metavar="NAME")
    rollback.set_defaults(handler=cli_models.models_rollback)
    return parser


def _global_options(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup, default: object
) -> None:
    """--config, --data-dir, --log-level, --log-format (on ``aidx`` itself, and again on every
    command with ``default=SUPPRESS``, where a value given overrides one given before it)."""
    options: list[tuple[str, dict[str, Any]]] = [
        ("--config", {"type": Path, "help": "YAML configuration file (or AIDX_CONFIG)"}),
        ("--data-dir", {"type": Path, "help": "override data_dir"}),
        ("--log-level", {"choices": ["DEBUG", "INFO", "WARNING", "ERROR"]}),
        ("--log-format", {"choices": ["text", "json"]}),
    ]
    taken: dict[str, object] = getattr(parser, "_option_string_actions", {})
    for flag, settings in options:
        if flag not in taken:  # `aidx train --config` is the training configuration
            parser.add_argument(flag, default=default, **settings)


def _everywhere(parser: argparse.ArgumentParser) -> None:
    """Give every command (and action) the global options too: `aidx serve --data-dir X` works
    as `aidx --data-dir X serve` does, and each command's --help lists them."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command in set(action.choices.values()):
                # (a group shares its command's flags: a flag the command has is left out)
                group = command.add_argument_group("global options (also before the command)")
                _global_options(group, default=argparse.SUPPRESS)
                _everywhere(command)


def main(argv: Sequence[str] | None = None) -> int:
    as_supervised_child()  # one of `aidx serve`'s processes: die with it, Ctrl-C is its job
    # Files 0640, folders 0750 for everything this command writes (aidx.permissions).
    with private_umask():
        try:
            return _main(argv)
        except BrokenPipeError:  # `aidx models show | head`: the reader is gone, not an error
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())  # no second error when Python flushes stdout
            return EXIT_OK


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    _everywhere(parser)
    args = parser.parse_args(argv)
    from aidx.config import ConfigError, load_config  # after parsing: `aidx --help` needs neither

    overrides: dict[str, Any] = {}
    if args.data_dir is not None:
        overrides["data_dir"] = str(args.data_dir)
    if args.log_level:
        overrides["log.level"] = args.log_level
    if args.log_format:
        overrides["log.format"] = args.log_format
    for flag, key in (
        ("ae_title", "node.ae_title"),
        ("host", "node.host"),
        ("port", "node.port"),
        ("workers", "pipeline.workers"),
        ("metrics_port", "metrics.port"),
        ("ui_host", "ui.host"),
        ("ui_port", "ui.port"),
    ):
        if getattr(args, flag, None) is not None:
            overrides[key] = getattr(args, flag)
    if getattr(args, "no_ui", False):
        overrides["ui.enabled"] = False
    try:
        config = load_config(args.config, overrides=overrides)
    except ConfigError as exc:
        print(f"aidx: {exc}", file=sys.stderr)
        return EXIT_USAGE
    setup_logging(config.log.level, config.log.format)
    tighten_data_dir(config.data_dir, sqlite_path(config.store_url()))
    # Secret keys other users could reach: refused, with the fix (aidx.keys).
    secrets_open = secret_problems(config.data_dir)
    for problem in secrets_open:
        print(f"aidx: {problem}", file=sys.stderr)
    if secrets_open:
        return EXIT_USAGE
    handler: Handler = args.handler
    try:
        return handler(args, config)
    except Exception as exc:
        # A store that is too new or cannot be opened, from any command that opens it (imported
        # here: the store and SQLAlchemy are loaded by the commands that use them, not by all).
        from aidx.store.migrations import SchemaVersionError
        from aidx.store.store import StoreUnavailableError

        if not isinstance(exc, (SchemaVersionError, StoreUnavailableError)):
            raise
        print(f"aidx: {exc}", file=sys.stderr)
        return EXIT_USAGE
