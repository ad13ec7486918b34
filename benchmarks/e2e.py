"""Benchmark: a CT study from the PACS to its AI result back in the PACS, through `aidx serve`.

A real Orthanc plays the PACS (TCP_NODELAY=1). `aidx serve` runs with the active model (the
shipped default unless --model says otherwise), Orthanc as destination "PACS" and a short quiet
period. DCMTK storescu sends each phantom study (300 x 512² by default) to aidx; the clock
starts when storescu returns (after the last C-STORE response and the release) and stops when
Orthanc's REST API lists the study's SR. Reported, medians over --repeats:

- latency beyond the quiet period, and its stages from `aidx status --json`: quiet period (last
  image -> complete), queue wait (complete -> inference started), inference (started -> done,
  which includes reading the series, preprocessing, the model, postprocessing and writing SR and
  SEG), export (done -> the SR listed by Orthanc: queueing, the association, Orthanc storing
  and indexing it);
- the baseline measured in the same run: `aidx infer` on the same files (inference alone, the
  same code, no network, no queue), and the ratio;
- throughput: --studies studies sent back to back, studies per hour from the first send to the
  last SR in Orthanc (the queue holds up to all of them at once).

Target on a 2-core CPU: <= 15 s beyond the quiet period.

Usage: python benchmarks/e2e.py [--repeats 3] [--studies 10] [--slices 300] [--matrix 512]
       [--quiet 2] [--model NAME@VERSION] [--workers 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
HERE = str(Path(__file__).resolve().parent)
sys.path[:] = [p for p in sys.path if p != HERE]  # our folder would shadow packages
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import yaml

from aidx.store.store import Store
from tests.peers import (
    LOOPBACK,
    Orthanc,
    free_port,
    peer_env,
    poll_until,
    start_process,
    stop_process,
    storescu_command,
    wait_for_port,
)
from training.phantom import PhantomOptions, generate

AIDX = [sys.executable, "-m", "aidx"]
STAGES = ("quiet", "queue", "inference", "export")


def when(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


class Setup:
    def __init__(self, root: Path, args: argparse.Namespace) -> None:
        self.root = root
        self.node_port = free_port()
        self.orthanc = Orthanc(
            root / "orthanc", modalities={"AIDX": ("AIDX", LOOPBACK, self.node_port)}
        ).start()
        config: dict[str, Any] = {
            "data_dir": str(root / "data"),
            "node": {"port": self.node_port, "study_quiet_period_s": args.quiet},
            "destinations": {
                "PACS": {"ae_title": "ORTHANC", "host": LOOPBACK, "port": self.orthanc.dicom_port}
            },
            "outbox": {"initial_backoff_s": 1.0},
            "metrics": {"port": 0},
            "pipeline": {"workers": args.workers, "poll_interval_s": 0.5},
            "log": {"level": "INFO"},
        }
        if args.model:
            config["pipeline"]["routes"] = [{"name": "default", "model": args.model}]
        if args.models_dir:
            config["models"] = {"dir": str(args.models_dir), "default": args.model_name}
        self.config_path = root / "aidx.yaml"
        self.config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
        env = {k: v for k, v in os.environ.items() if not k.startswith("AIDX_")}
        self.env = env
        self.serve = start_process(
            [*AIDX, "--config", str(self.config_path), "serve"], root / "serve.log"
        )
        wait_for_port(LOOPBACK, self.node_port, 60, process=self.serve)
        self.store = Store(f"sqlite:///{root / 'data' / 'aidx.db'}", root=root / "data")

    def close(self) -> None:
        self.store.close()
        stop_process(self.serve)
        self.orthanc.stop()

    def aidx(self, *args: str) -> str:
        done = subprocess.run(
            [*AIDX, "--config", str(self.config_path), *args],
            capture_output=True,
            text=True,
            env=self.env,
            check=True,
        )
        return done.stdout

    def send(self, study: Path) -> float:
        command = storescu_command(LOOPBACK, self.node_port, [study], called_aet="AIDX")
        subprocess.run(command, check=True, capture_output=True, env=peer_env())
        return time.time()

    def sr_in_pacs(self, study_uid: str) -> bool:
        found = self.orthanc.request(
            "POST",
            "/tools/find",
            json.dumps(
                {"Level": "Series", "Query": {"StudyInstanceUID": study_uid, "Modality": "SR"}}
            ).encode(),
        )
        return bool(found)


def stages(setup: Setup, study_uid: str, sent: float, listed: float) -> dict[str, float]:
    status = json.loads(setup.aidx("status", study_uid, "--json"))
    events: dict[str, float] = {}
    for e in status["events"]:
        events.setdefault(e["event"], when(e["at"]))
    last_image = when(status["last_image"])
    return {
        "quiet": events["complete"] - last_image,
        "queue": events["inference_started"] - events["complete"],
        "inference": events["inference_done"] - events["inference_started"],
        "export": listed - events["inference_done"],
        "beyond_quiet": (listed - sent) - (events["complete"] - last_image),
        "total": listed - sent,
    }


def make_studies(root: Path, n: int, args: argparse.Namespace) -> list[tuple[Path, str]]:
    out = []
    for k in range(n):
        result = generate(
            root / f"study{k}",
            PhantomOptions(slices=args.slices, matrix=args.matrix, seed=9100 + k),
        )
        out.append((Path(result.dicom_dir), str(result.ground_truth["study_instance_uid"])))
    return out


def wait_sr(setup: Setup, study_uid: str, deadline_s: float) -> float:
    def done() -> bool:
        if setup.sr_in_pacs(study_uid):
            return True
        for job in setup.store.study_jobs(study_uid):
            if job["state"] in ("failed", "not_applicable"):
                raise RuntimeError(f"job {job['id']} of {study_uid}: {job['reason']}")
        return False

    poll_until(
        done,
        deadline_s,
        f"SR of {study_uid} in Orthanc",
        process=setup.serve,
        log_path=setup.root / "serve.log",
    )
    return time.time()


def baseline(setup: Setup, study: Path, out: Path) -> float:
    started = time.perf_counter()
    setup.aidx("infer", str(study), "--out", str(out))
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--studies", type=int, default=10)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--matrix", type=int, default=512)
    parser.add_argument("--quiet", type=float, default=2.0, help="study quiet period (s)")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--model", default="", help="NAME@VERSION (default: the active model)")
    parser.add_argument("--models-dir", type=Path, help="a model registry folder to use")
    parser.add_argument("--model-name", default="lung-nodule")
    args = parser.parse_args()
    print(
        f"aidx end to end: {args.slices} x {args.matrix}² CT, quiet period {args.quiet:g} s, "
        f"{args.workers} worker(s); {platform.node()}, {os.cpu_count()} CPUs"
    )
    with tempfile.TemporaryDirectory(prefix="aidx-e2e-") as tmp:
        root = Path(tmp)
        studies = make_studies(root / "studies", args.repeats + args.studies, args)
        setup = Setup(root, args)
        try:
            single: list[dict[str, float]] = []
            base: list[float] = []
            for k in range(args.repeats):
                path, uid = studies[k]
                sent = setup.send(path)
                listed = wait_sr(setup, uid, 600)
                single.append(stages(setup, uid, sent, listed))
                if k == 0:
                    jobs = json.loads(setup.aidx("status", uid, "--json"))["jobs"]
                    print(f"  model: {jobs[0]['model']}")
                base.append(baseline(setup, path, root / f"infer{k}"))
                s = single[-1]
                print(
                    f"  run {k + 1}: {s['total']:.2f} s from last response to SR in Orthanc, "
                    f"{s['beyond_quiet']:.2f} s beyond the quiet period; "
                    f"aidx infer {base[-1]:.2f} s"
                )
            med = {key: statistics.median(s[key] for s in single) for key in single[0]}
            print("\nlatency, medians of", args.repeats)
            for stage in STAGES:
                print(f"  {stage:<10} {med[stage]:7.2f} s")
            print(f"  beyond quiet period: {med['beyond_quiet']:.2f} s (target <= 15 s)")
            b = statistics.median(base)
            print(f"  baseline `aidx infer` on the same files (process start included): {b:.2f} s")
            print(f"  pipeline beyond quiet / baseline: {med['beyond_quiet'] / b:.2f}x")

            batch = studies[args.repeats :]
            started = time.time()
            for path, _ in batch:
                setup.send(path)
            last = max(wait_sr(setup, uid, 1800) for _, uid in batch)
            elapsed = last - started
            print(
                f"\nthroughput: {len(batch)} studies sent back to back, last SR in Orthanc after "
                f"{elapsed:.1f} s: {3600 * len(batch) / elapsed:.0f} studies/hour"
            )
        finally:
            setup.close()


if __name__ == "__main__":
    main()
