"""Benchmark: the extra cost per study of a challenger in shadow mode (issue 22), measured
against the champion alone in the same run.

Two child processes read the same --studies phantom studies (--slices x --matrix², indexed
into a fresh store as the node would) with one in-process worker:

- ``champion``: shadow mode off; each study is one live job;
- ``shadow``: the challenger in shadow (``Registry.set_shadow``); each study is the live job,
  then its shadow run (taken when no live job waits, as in `aidx serve`).

The champion is --model (default: the active model, the shipped default); the challenger is the
same ONNX file(s) registered under another version, so the extra cost is that of running a model
of the champion's size once more, with its own ONNX Runtime session. Reported: the median time
per study of the live job and of the shadow run, the extra time per study (shadow run / live
job), each child's peak RSS and their difference (the challenger's sessions and buffers).

Usage: python benchmarks/shadow.py [--studies 3] [--slices 60] [--matrix 256] [--model REF]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
HERE = str(Path(__file__).resolve().parent)
sys.path[:] = [p for p in sys.path if p != HERE]  # our folder would shadow packages
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from aidx.config import load_config
from aidx.pipeline.worker import Worker
from aidx.store.store import Store
from dicom_node.parse import read_file
from models.registry import Registry, site_registry
from training.phantom import PhantomOptions, generate

CHALLENGER_SUFFIX = "-shadow"


def _challenger(root: Path, model: str | None) -> tuple[Path, str, str]:
    """A registry under ``root`` holding the champion's files again as a second version."""
    config = load_config(env={}, overrides={"data_dir": str(root / "data")})
    registry = site_registry(config.models_dir())
    champion = registry.resolve(model, config.models.default)
    card = json.loads(champion.card.model_dump_json())
    card["version"] = (champion.card.version + CHALLENGER_SUFFIX)[:32]
    staging = root / "challenger"
    staging.mkdir()
    for f in champion.folder.iterdir():
        if f.suffix == ".onnx":
            (staging / f.name).write_bytes(f.read_bytes())
    (staging / "card.json").write_text(json.dumps(card), encoding="utf-8")
    models = root / "models"
    Registry(models, registry.roots[1:]).register(staging / "model.onnx", staging / "card.json")
    return models, champion.ref, f"{champion.card.name}@{card['version']}"


def child(args: argparse.Namespace) -> None:
    """One mode over the studies; prints its figures as JSON."""
    root = Path(args.work) / args.mode
    config = load_config(
        env={},
        overrides={
            "data_dir": str(root / "data"),
            "models.dir": args.models,
            "models.default": args.champion.partition("@")[0],
        },
    )
    config.data_dir.mkdir(parents=True)
    registry = site_registry(config.models_dir())
    registry.promote(*args.champion.split("@"))
    if args.mode == "shadow":
        registry.set_shadow(*args.challenger.split("@"), None, "benchmark")
    store = Store(config.store_url())
    worker = Worker(config, store, registry=registry)
    live: list[float] = []
    shadow: list[float] = []
    for folder in sorted(Path(args.studies_dir).iterdir()):
        uid = ""
        for path in sorted((folder / "dicom").glob("*.dcm")):
            record = replace(read_file(path.read_bytes(), "PACS"), path=str(path))
            store.index_instance(record, time.time() - 10.0, 1.0)
            uid = record.study_uid
        store.complete_study(uid, time.time())
        started = time.perf_counter()
        assert worker.run_once(), "no live job"
        live.append(time.perf_counter() - started)
        if args.mode == "shadow":
            started = time.perf_counter()
            assert worker.run_once(), "no shadow run"
            shadow.append(time.perf_counter() - started)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"live_s": live, "shadow_s": shadow, "peak_mb": peak_mb}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=3)
    parser.add_argument("--slices", type=int, default=60)
    parser.add_argument("--matrix", type=int, default=256)
    parser.add_argument("--model", help="the champion, a shipped NAME@VERSION (default: newest)")
    parser.add_argument("--mode", choices=("champion", "shadow"), help=argparse.SUPPRESS)
    for hidden in ("work", "models", "champion", "challenger", "studies-dir"):
        parser.add_argument(f"--{hidden}", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        child(args)
        return
    with tempfile.TemporaryDirectory(prefix="aidx-bench-shadow-") as tmp:
        work = Path(tmp)
        models, champion, challenger = _challenger(work, args.model)
        studies = work / "studies"
        for n in range(args.studies):
            generate(
                studies / f"study-{n}",
                PhantomOptions(seed=100 + n, slices=args.slices, matrix=args.matrix, workers=1),
            )
        figures: dict[str, Any] = {}
        for mode in ("champion", "shadow"):
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--mode",
                    mode,
                    "--work",
                    str(work),
                    "--models",
                    str(models),
                    "--champion",
                    champion,
                    "--challenger",
                    challenger,
                    "--studies-dir",
                    str(studies),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            figures[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    alone = statistics.median(figures["champion"]["live_s"])
    live = statistics.median(figures["shadow"]["live_s"])
    extra = statistics.median(figures["shadow"]["shadow_s"])
    peak_alone, peak_shadow = figures["champion"]["peak_mb"], figures["shadow"]["peak_mb"]
    print(f"champion {champion}, challenger {challenger} (the same files), {args.studies} studies")
    print(f"  {args.slices} x {args.matrix}^2 phantoms; medians per study")
    print(f"  champion alone:         live job {alone:.2f} s, peak RSS {peak_alone:.0f} MB")
    print(f"  with shadow:            live job {live:.2f} s, shadow run {extra:.2f} s")
    print(
        f"  extra per study:        {extra:.2f} s ({extra / alone:.2f}x the live job), "
        f"peak RSS +{peak_shadow - peak_alone:.0f} MB ({peak_shadow:.0f} MB)"
    )
    print(
        f"  live job with shadow on / alone: {live / alone:.2f}x (should be ~1: shadow runs after)"
    )


if __name__ == "__main__":
    main()
