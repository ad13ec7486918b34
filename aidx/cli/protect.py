"""`aidx backup`, `aidx restore` and `aidx verify` (aidx.store.protect), and `aidx purge`
(aidx.store.retention).

The store, SQLAlchemy and pydicom are imported when a command runs, not for every `aidx`
process."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from aidx.cli.exit_codes import EXIT_FAILED, EXIT_OK, EXIT_USAGE

if TYPE_CHECKING:
    from aidx.config import AidxConfig

ENV_CONFIG_FILE = "AIDX_CONFIG"  # aidx.config.ENV_CONFIG_FILE (not imported: see above)


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    save = sub.add_parser(
        "backup",
        help="back up the store, images, results, signed reports, models and configuration "
        "(also while aidx serve runs; incremental into the same folder)",
    )
    save.add_argument("--to", type=Path, required=True, metavar="DIR", help="the backup folder")
    save.add_argument(
        "--include-secrets",
        action="store_true",
        help="also aidx's keys (data_dir/keys, feedback.key) and the TLS private keys, in "
        "clear (mode 0600): keep such a backup as safe as the keys themselves",
    )
    save.set_defaults(handler=backup)
    load = sub.add_parser(
        "restore", help="lay out a backup as a new data folder (checked against its manifest)"
    )
    load.add_argument("backup_dir", type=Path, metavar="DIR", help="a folder `aidx backup` wrote")
    load.add_argument(
        "--store-url",
        metavar="URL",
        help="for a PostgreSQL backup: the new, empty database to restore the store into",
    )
    load.set_defaults(handler=restore)
    check = sub.add_parser(
        "verify",
        help="check that every file the store lists is there (non-zero exit and a report if not)",
    )
    check.add_argument(
        "--deep",
        action="store_true",
        help="also each file's content: the SHA-256 the backup recorded, else read as DICOM",
    )
    check.add_argument(
        "--manifest",
        type=Path,
        metavar="FILE",
        help="a backup's manifest.json to check hashes against (default: "
        "DATA_DIR/backup-manifest.json, which restore writes)",
    )
    check.set_defaults(handler=verify)
    purge = sub.add_parser(
        "purge",
        help="delete the received images that storage.retention lets go now (aidx serve does "
        "this every storage.retention.interval_s)",
    )
    purge.add_argument(
        "--dry-run", action="store_true", help="only list the studies whose images would go"
    )
    purge.set_defaults(handler=purge_images)


def backup(args: argparse.Namespace, config: AidxConfig) -> int:
    from sqlalchemy.exc import SQLAlchemyError

    from aidx.store.protect.backup import backup as make_backup
    from aidx.store.protect.manifest import BackupError

    config_file = getattr(args, "config", None) or os.environ.get(ENV_CONFIG_FILE)
    try:
        report = make_backup(
            config, args.to, args.include_secrets, Path(config_file) if config_file else None
        )
    except BackupError as exc:
        print(f"aidx backup: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (OSError, SQLAlchemyError) as exc:
        print(
            f"aidx backup: failed, the previous backup in {args.to} is kept: {exc}", file=sys.stderr
        )
        return EXIT_FAILED
    m = report.manifest
    size = sum(e.size for e in m.files.values())
    print(
        f"backup in {report.folder}: {len(m.files)} files, {size} bytes (copied {report.copied} "
        f"files, {report.copied_bytes} bytes; {report.reused} unchanged since the last backup; "
        f"{report.removed} no longer listed removed)"
    )
    if m.secrets_left_out:
        print(
            f"left out {len(m.secrets_left_out)} secret(s) (aidx's keys, TLS private keys): "
            "keep them apart, or back up again with --include-secrets"
        )
    if m.missing:
        print(
            f"aidx backup: {len(m.missing)} files the store lists were gone when they were to "
            f"be copied (e.g. {m.missing[0]}); run `aidx verify`",
            file=sys.stderr,
        )
        return EXIT_FAILED
    return EXIT_OK


def restore(args: argparse.Namespace, config: AidxConfig) -> int:
    from sqlalchemy.exc import SQLAlchemyError

    from aidx.store.protect.manifest import BackupError
    from aidx.store.protect.restore import restore as restore_backup

    if getattr(args, "data_dir", None) is None:
        print(
            "aidx restore: give the new data folder with --data-dir NEW (a folder that does "
            "not exist yet, or is empty)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    try:
        report = restore_backup(args.backup_dir, config.data_dir, args.store_url)
    except BackupError as exc:
        print(f"aidx restore: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (OSError, SQLAlchemyError) as exc:
        print(f"aidx restore: failed ({exc}); {config.data_dir} is incomplete", file=sys.stderr)
        return EXIT_FAILED
    print(
        f"restored {report.files} files ({report.bytes} bytes) into {report.data_dir}; store "
        f"{report.store} ({report.rewritten} rows made relative to the new folder)"
    )
    print(
        f"run it with: aidx --data-dir {report.data_dir} serve (the old configuration is in "
        f"{report.data_dir / 'config'}: unset or change data_dir, storage.root, models.dir"
        + (" and set store.url" if args.store_url else "")
        + " there); check it with: aidx --data-dir "
        f"{report.data_dir} verify --deep"
    )
    return EXIT_OK


def verify(args: argparse.Namespace, config: AidxConfig) -> int:
    from sqlalchemy.exc import SQLAlchemyError

    from aidx.store.protect.manifest import BackupError, Manifest
    from aidx.store.protect.restore import RESTORED_MANIFEST
    from aidx.store.protect.verify import verify as verify_store
    from aidx.store.store import Store

    if config.store.url is None and not (config.data_dir / "aidx.db").is_file():
        print(
            f"aidx verify: no store in {config.data_dir}: give the data folder with --data-dir",
            file=sys.stderr,
        )
        return EXIT_USAGE
    manifest = None
    manifest_path = args.manifest or config.data_dir / RESTORED_MANIFEST
    if args.deep and (args.manifest or manifest_path.is_file()):
        try:
            manifest = Manifest.read_file(manifest_path)
        except BackupError as exc:
            print(f"aidx verify: {exc}", file=sys.stderr)
            return EXIT_USAGE
    try:
        store = Store.for_config(config)
        try:
            report = verify_store(store, args.deep, manifest)
        finally:
            store.close()
    except (OSError, SQLAlchemyError) as exc:
        print(f"aidx verify: cannot read the store: {exc}", file=sys.stderr)
        return EXIT_USAGE
    how = ""
    if args.deep:
        source = f" ({manifest_path})" if manifest else " (no backup manifest: none recorded)"
        how = f"; {report.hashed} against recorded SHA-256{source}, {report.parsed} read as DICOM"
    if report.ok:
        print(f"verified {report.checked} files the store lists: all present{how}")
        return EXIT_OK
    print(
        f"aidx verify: {len(report.problems)} of {report.checked} files the store lists are "
        f"missing or damaged{how}:",
        file=sys.stderr,
    )
    for problem in report.problems:
        print(f"  {problem}", file=sys.stderr)
    print(
        "restore them from a backup (aidx restore DIR --data-dir NEW, then copy the files named)",
        file=sys.stderr,
    )
    return EXIT_FAILED


def purge_images(args: argparse.Namespace, config: AidxConfig) -> int:
    from sqlalchemy.exc import SQLAlchemyError

    from aidx.store.retention import plan, purge
    from aidx.store.store import Store

    policy = config.storage.retention
    if not policy.enabled():
        print(
            "aidx purge: storage.retention sets no rule, so nothing goes: set "
            "storage.retention.images_days or storage.retention.max_disk_percent",
            file=sys.stderr,
        )
        return EXIT_USAGE
    try:
        store = Store.for_config(config)
        try:
            picked = plan(store, policy)
            for item in picked:
                print(
                    f"{'would delete' if args.dry_run else 'deleting'} {item.instances} images "
                    f"({item.bytes} bytes) of study {item.study_uid} ({item.rule})"
                )
                if not args.dry_run:
                    purge(store, item)
        finally:
            store.close()
    except (OSError, SQLAlchemyError) as exc:
        print(f"aidx purge: {exc}", file=sys.stderr)
        return EXIT_FAILED
    total = sum(p.instances for p in picked)
    verb = "would go" if args.dry_run else "deleted (audited)"
    print(f"{total} images of {len(picked)} studies {verb}; results and signed reports are kept")
    return EXIT_OK
