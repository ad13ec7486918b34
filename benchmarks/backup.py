"""Benchmark: `aidx backup`, `aidx restore` and `aidx verify --deep` for N studies, and the
incremental backup after one new study (issue 21's figures).

Each study is a phantom CT series (--slices x --matrix², uncompressed) indexed into an SQLite
store under the storage root as the node stores it (no inference: the images are what a backup
is made of). Reported: the backup's size, the times of the first backup, the restore into a new
folder, `verify --deep` of the restored folder, and the next backup after one more study
(copying only the new images and the store). The commands run as a user runs them (`python -m
aidx`), so each time includes the start of the interpreter (about 1 s).

Usage: python benchmarks/backup.py [--studies 10] [--slices 64] [--matrix 256]
"""

from __future__ import annotations

import argparse
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from aidx.config import load_config
from aidx.store.store import Store
from dicom_node.parse import read_file
from training.phantom import PhantomOptions, generate


def add_study(store: Store, spool: Path, work: Path, seed: int, args: argparse.Namespace) -> int:
    """Generate one phantom study, place it in the spool and index it; returns its bytes."""
    options = PhantomOptions(seed=seed, slices=args.slices, matrix=args.matrix, workers=1)
    dicom = generate(work / f"study-{seed}", options).dicom_dir
    size = 0
    for path in sorted(dicom.glob("*.dcm")):
        record = read_file(path.read_bytes(), "PACS")
        target = spool / record.study_uid / record.series_uid / f"{record.sop_uid}.dcm"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
        store.index_instance(replace(record, path=str(target)), time.time(), 1.0)
        size += target.stat().st_size
    return size


def timed(*command: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "aidx", *command], check=True, capture_output=True)
    return time.perf_counter() - start


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=10)
    parser.add_argument("--slices", type=int, default=64)
    parser.add_argument("--matrix", type=int, default=256)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="aidx-bench-backup-") as tmp:
        work = Path(tmp)
        data = work / "data"
        config = load_config(env={}, overrides={"data_dir": str(data)})
        data.mkdir()
        store = Store.for_config(config)
        images = sum(
            add_study(store, config.storage_root() / "spool", work, seed, args)
            for seed in range(args.studies)
        )
        first = timed("--data-dir", str(data), "backup", "--to", str(work / "backup"))
        size = folder_bytes(work / "backup")
        restore = timed("restore", str(work / "backup"), "--data-dir", str(work / "restored"))
        deep = timed("--data-dir", str(work / "restored"), "verify", "--deep")
        add_study(store, config.storage_root() / "spool", work, args.studies, args)
        store.close()
        again = timed("--data-dir", str(data), "backup", "--to", str(work / "backup"))
    print(
        f"{platform.processor() or platform.machine()}, {args.studies} studies of "
        f"{args.slices} x {args.matrix}² ({images / 1e6:.1f} MB of images)"
    )
    print(f"backup: {first:.1f} s, {size / 1e6:.1f} MB")
    print(f"restore: {restore:.1f} s; verify --deep of the restored folder: {deep:.1f} s")
    print(f"incremental backup with one new study: {again:.1f} s")


if __name__ == "__main__":
    main()
