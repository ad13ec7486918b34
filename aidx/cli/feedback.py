"""`aidx feedback export`: radiologists' signed review decisions as a training dataset.

A thin wrapper over :mod:`training.feedback` (torch-free), imported only when the command runs,
as every training-side command is.
"""

from __future__ import annotations

import argparse
import sys
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from aidx.cli.exit_codes import EXIT_FAILED, EXIT_OK, EXIT_USAGE

if TYPE_CHECKING:
    from aidx.config import AidxConfig

SINCE_FORMAT = "YYYY-MM-DD or YYYY-MM-DDTHH:MM[:SS] (local time unless it ends with +HH:MM or Z)"


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The ``feedback`` command."""
    feedback = sub.add_parser(
        "feedback", help="export radiologists' signed review decisions as training data"
    )
    feedback_sub = feedback.add_subparsers(dest="feedback_command", metavar="ACTION", required=True)
    export = feedback_sub.add_parser(
        "export",
        help="write signed reviews as a canonical training dataset (NIfTI + dataset.json)",
        description="Write every signed review as a case of the canonical training dataset in "
        "OUT_DIR: the CT series, its lesions (accepted, edited and added findings) and label "
        "mask, and the decisions as provenance (model version, decision, reviewer role; "
        "rejected AI findings as hard negatives). Case ids are pseudonymous (keyed by "
        "DATA_DIR/feedback.key) and no file holds patient data or UIDs. Exporting again into "
        "the same folder replaces the cases of the studies exported and keeps the others.",
    )
    export.add_argument("out", type=Path, metavar="OUT_DIR")
    export.add_argument(
        "--since",
        type=_since,
        metavar="DATE",
        help="only reviews signed at or after this date or time, e.g. 2026-11-01 or "
        "2026-11-01T08:00 (default: all)",
    )
    export.set_defaults(handler=feedback_export)


def _since(text: str) -> datetime:
    try:
        return datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date: use {SINCE_FORMAT}") from None


def feedback_export(args: argparse.Namespace, config: AidxConfig) -> int:
    from aidx.cli.common import NoStoreError, cli_actor, open_existing_store
    from training.dataset import DatasetError
    from training.feedback import export_feedback, feedback_key
    from ui.review import Reviews

    since: datetime | None = args.since
    try:
        store = open_existing_store(config)
    except NoStoreError as exc:
        return _fail(exc)
    try:
        key = feedback_key(config.data_dir)
        summary = export_feedback(
            Reviews(store),
            store,
            args.out,
            key,
            since=since.timestamp() if since is not None else None,  # naive: local time
            actor=cli_actor(),
        )
    except DatasetError as exc:
        return _fail(exc)
    except OSError as exc:
        return _fail(f"{exc.filename or args.out}: {exc.strerror or exc}")
    finally:
        store.close()
    for line in summary.skipped:
        print(f"skipped {line}")
    for line in summary.failed:
        print(f"aidx feedback export: not exported: {line}", file=sys.stderr)
    when = f" signed since {since.isoformat(sep=' ')}" if since is not None else ""
    if summary.studies == 0 and not summary.failed:
        print(f"no review{when or ' signed'} to export; nothing written to {args.out}")
        return EXIT_OK
    print(
        f"exported {_count(summary.studies, 'study', 'studies')}{when} "
        f"({_count(summary.lesions, 'lesion')}, "
        f"{_count(summary.hard_negatives, 'hard negative')}) to "
        f"{Path(args.out) / 'dataset.json'}; the dataset holds "
        f"{_count(summary.cases_total, 'case')}"
    )
    if summary.failed:
        print(
            f"aidx feedback export: {_count(len(summary.failed), 'study', 'studies')} could not "
            "be exported (above); the others were",
            file=sys.stderr,
        )
        return EXIT_FAILED
    return EXIT_OK


def _count(n: int, one: str, many: str | None = None) -> str:
    return f"{n} {one if n == 1 else many or one + 's'}"


def _fail(problem: object) -> int:
    print(f"aidx feedback export: {problem}", file=sys.stderr)
    return EXIT_USAGE
