"""`aidx export-study`: one study's images with its AI results (SR, SEG) and the radiologist's
signed SR, as received or de-identified (:mod:`aidx.deidentify`), into a new folder; audited.

The files come from the store (:meth:`Store.study_instances`, :meth:`Store.study_results`, the
reviews); the export is written beside ``OUT`` and renamed to it at the end, so a failed
export leaves nothing behind and an existing folder with files in it is never written into.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aidx.cli.exit_codes import EXIT_FAILED, EXIT_OK, EXIT_USAGE

if TYPE_CHECKING:
    from aidx.config import AidxConfig
    from aidx.store.store import Store

log = logging.getLogger("aidx.export")

AUDIT_ACTION = "study_export"
KEY_NAME = "deid"  # <data_dir>/keys/deid.key (aidx.keys)
MANIFEST = "manifest.json"


class _UsageError(Exception):
    """Bad input: the message says what to change; nothing was written."""


@dataclass(frozen=True)
class _Source:
    kind: str  # image, sr, seg, signed-sr
    path: Path
    sop_uid: str


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The ``export-study`` command."""
    export = sub.add_parser(
        "export-study",
        help="write a study's images and AI results (SR, SEG, signed SR) to a folder, "
        "optionally de-identified",
        description="Write the study's images as received, its AI SR and SEG and the signed "
        "SR (if any) to OUT (a new or empty folder), one sub-folder per series. With "
        "--deidentify every object is de-identified per the DICOM PS3.15 Basic Application "
        "Level Confidentiality Profile, UIDs replaced consistently (keyed by "
        "DATA_DIR/keys/deid.key, so exporting again gives the same UIDs) so that the results "
        "still reference the images. The export is recorded in the audit log.",
    )
    export.add_argument("study_uid", metavar="STUDY_UID")
    export.add_argument("out", type=Path, metavar="OUT")
    export.add_argument(
        "--deidentify",
        action="store_true",
        help="de-identify (PS3.15 Basic Application Level Confidentiality Profile)",
    )
    export.add_argument(
        "--retain-full-dates",
        action="store_true",
        help="with --deidentify: keep dates and times (Retain Longitudinal Temporal "
        "Information with Full Dates Option)",
    )
    export.add_argument(
        "--clean-descriptors",
        action="store_true",
        help="with --deidentify: keep descriptions and comments that hold no identifying "
        "value (Clean Descriptors Option)",
    )
    export.set_defaults(handler=export_study)


def export_study(args: argparse.Namespace, config: AidxConfig) -> int:
    from pydicom.errors import InvalidDicomError

    from aidx.cli.common import NoStoreError, cli_actor, open_existing_store

    if (args.retain_full_dates or args.clean_descriptors) and not args.deidentify:
        return _fail("--retain-full-dates and --clean-descriptors go with --deidentify")
    out: Path = args.out
    try:
        _check_out(out)
        store = open_existing_store(config)
    except (_UsageError, NoStoreError) as exc:
        return _fail(exc)
    try:
        sources = _sources(store, args.study_uid)
        missing = [s for s in sources if not s.path.is_file()]
        if missing:
            for s in missing:
                print(
                    f"aidx export-study: the {s.kind} {s.sop_uid} is not at {s.path}",
                    file=sys.stderr,
                )
            print(
                f"aidx export-study: {len(missing)} of the study's files are missing; nothing "
                "was written (restore them from the data folder's backup)",
                file=sys.stderr,
            )
            return EXIT_FAILED
        if args.deidentify:
            summary = _write_deidentified(config, sources, out, args)
        else:
            summary = _write_as_received(sources, out)
        _audit(store, cli_actor(), args.study_uid, summary)
    except _UsageError as exc:
        return _fail(exc)
    except (OSError, InvalidDicomError) as exc:  # nothing was written (_into)
        where = getattr(exc, "filename", None) or out
        print(
            f"aidx export-study: {where}: {getattr(exc, 'strerror', None) or exc}", file=sys.stderr
        )
        return EXIT_FAILED
    finally:
        store.close()
    log.info(
        "exported study %s%s: %d files",
        args.study_uid,
        f" de-identified as {summary['study_uid']}" if args.deidentify else "",
        len(summary["files"]),
    )
    counts = _counts(summary["files"])
    what = "de-identified as study " + summary["study_uid"] if args.deidentify else "as received"
    print(f"exported study {args.study_uid} {what} to {out}: {counts}")
    return EXIT_OK


# --------------------------------------------------------------------------- what to write
def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise _UsageError(f"{out} is a file: give a new or empty folder")
    if out.is_dir() and any(out.iterdir()):
        raise _UsageError(f"{out} is not empty: give a new or empty folder (nothing was written)")


def _sources(store: Store, study_uid: str) -> list[_Source]:
    from ui.review import Reviews

    if store.study(study_uid) is None:
        raise _UsageError(
            f"no study {study_uid} in the store: `aidx status` lists the studies received"
        )
    found = [
        _Source("image", Path(row["path"]), str(row["sop_uid"]))
        for row in sorted(store.study_instances(study_uid), key=lambda r: str(r["path"]))
    ]
    for result in store.study_results(study_uid):
        found.append(_Source("sr", Path(result["sr_path"]), str(result["sr_sop_uid"])))
        if result["seg_path"]:
            found.append(_Source("seg", Path(result["seg_path"]), "SEG of " + result["sr_sop_uid"]))
    for case in Reviews(store).signed():
        if case.study_uid == study_uid and case.signed_sr_path is not None:
            found.append(_Source("signed-sr", case.signed_sr_path, str(case.signed_sr_uid)))
    seen: set[Path] = set()
    unique = []
    for s in found:
        if s.path not in seen:
            seen.add(s.path)
            unique.append(s)
    return unique


# ---------------------------------------------------------------------------------- writing
def _write_deidentified(
    config: AidxConfig, sources: list[_Source], out: Path, args: argparse.Namespace
) -> dict[str, Any]:
    import pydicom

    from aidx.deidentify import PROFILE_EDITION, DeidentificationError, Deidentifier, Options
    from aidx.keys import SecretKeyError, secret_key

    options = Options(
        retain_full_dates=args.retain_full_dates, clean_descriptors=args.clean_descriptors
    )
    try:
        deid = Deidentifier(secret_key(config.data_dir, KEY_NAME), options)
    except SecretKeyError as exc:
        raise _UsageError(str(exc)) from None
    # First every header, for the identifying values that cleaned text must not hold; the
    # results (SR, SEG: no pixel data to speak of) are kept, the images read again to write.
    read: dict[Path, Any] = {}
    for s in sources:
        ds = pydicom.dcmread(s.path, stop_before_pixels=s.kind == "image")
        deid.learn(ds)
        if s.kind != "image":
            read[s.path] = ds
    files: list[dict[str, str]] = []

    def write(folder: Path) -> None:
        for s in sources:
            ds = read.pop(s.path, None) or pydicom.dcmread(s.path)
            try:
                deid.apply(ds)
            except DeidentificationError as exc:
                raise _UsageError(f"{exc}; nothing was written") from None
            files.append(_save(ds, folder, s.kind))
        _write_manifest(folder, summary)

    first = pydicom.dcmread(sources[0].path, stop_before_pixels=True)
    summary: dict[str, Any] = {
        "study_uid": deid.uid(str(first.StudyInstanceUID)),
        "deidentified": True,
        "profile": PROFILE_EDITION,
        "options": options.names(),
        "files": files,
    }
    _into(out, write)
    return summary


def _write_as_received(sources: list[_Source], out: Path) -> dict[str, Any]:
    import pydicom

    files: list[dict[str, str]] = []

    def write(folder: Path) -> None:
        for s in sources:
            ds = pydicom.dcmread(s.path, stop_before_pixels=True)
            target = folder / str(ds.SeriesInstanceUID) / f"{ds.SOPInstanceUID}.dcm"
            target.parent.mkdir(exist_ok=True)
            shutil.copyfile(s.path, target)  # the bytes as received
            files.append(_entry(ds, target.relative_to(folder), s.kind))
        _write_manifest(folder, summary)

    first = pydicom.dcmread(sources[0].path, stop_before_pixels=True)
    summary: dict[str, Any] = {
        "study_uid": str(first.StudyInstanceUID),
        "deidentified": False,
        "files": files,
    }
    _into(out, write)
    return summary


def _save(ds: Any, folder: Path, kind: str) -> dict[str, str]:
    target = folder / str(ds.SeriesInstanceUID) / f"{ds.SOPInstanceUID}.dcm"
    target.parent.mkdir(exist_ok=True)
    ds.save_as(target, enforce_file_format=True)
    return _entry(ds, target.relative_to(folder), kind)


def _entry(ds: Any, path: Path, kind: str) -> dict[str, str]:
    return {
        "path": str(path),
        "kind": kind,
        "sop_class_uid": str(ds.SOPClassUID),
        "sop_instance_uid": str(ds.SOPInstanceUID),
        "series_instance_uid": str(ds.SeriesInstanceUID),
    }


def _into(out: Path, write: Any) -> None:
    """Run ``write(folder)`` on a new folder beside ``out``, then rename it to ``out``; on any
    failure the new folder is removed and ``out`` is as it was."""
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    partial.mkdir()
    try:
        write(partial)
        if out.is_dir():
            out.rmdir()  # empty (checked before): the export takes its place
        partial.replace(out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def _write_manifest(folder: Path, summary: dict[str, Any]) -> None:
    (folder / MANIFEST).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")


def _audit(store: Store, actor: str, study_uid: str, summary: dict[str, Any]) -> None:
    from ui.audit import Audit

    detail = {k: v for k, v in summary.items() if k != "files"}
    detail["exported_study_uid"] = detail.pop("study_uid")
    detail["files"] = len(summary["files"])
    Audit(store).record(actor, None, AUDIT_ACTION, study_uid=study_uid, detail=detail)


def _counts(files: list[dict[str, str]]) -> str:
    kinds: dict[str, int] = {}
    for f in files:
        kinds[f["kind"]] = kinds.get(f["kind"], 0) + 1
    names = {"image": "image", "sr": "AI SR", "seg": "SEG", "signed-sr": "signed SR"}
    return ", ".join(
        f"{n} {names[k]}{'s' if n != 1 and k == 'image' else ''}" for k, n in kinds.items()
    )


def _fail(problem: object) -> int:
    print(f"aidx export-study: {problem}", file=sys.stderr)
    return EXIT_USAGE
