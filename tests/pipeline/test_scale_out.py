"""Scale-out as issue 19 describes it, with real servers: two DICOM nodes and three Celery
workers, each process with its own local state folder, on one PostgreSQL store, one RabbitMQ
and one shared storage root. Orthanc sends one study split across both nodes: it is assembled
once, one job runs on one of the workers, and its SR and SEG reach Orthanc once."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy import select

from aidx.store.schema import jobs, results
from aidx.store.store import Store
from tests.peers import LOOPBACK, Orthanc, echoscu, free_port, poll_until, stop_process
from tests.pipeline.harness import (
    JOB_DEADLINE_S,
    NODE_AET,
    instance_counts,
    pipeline_config,
    study_series,
)
from tests.pipeline.harness import study_uid as uid_of

AIDX = [sys.executable, "-m", "aidx"]


def test_two_nodes_three_workers_one_store_one_broker_one_shared_root(
    tmp_path: Path,
    models_dir: Path,
    chest_study: Path,
    postgres_server: Any,
    rabbitmq_server: Any,
) -> None:
    ports = {"AIDX_A": free_port(), "AIDX_B": free_port()}
    orthanc = Orthanc(
        tmp_path / "orthanc", modalities={n: (NODE_AET, LOOPBACK, p) for n, p in ports.items()}
    ).start()
    store_url = postgres_server.new_database()
    config = pipeline_config(ports["AIDX_A"], orthanc.dicom_port, models_dir, workers=0)
    config["store"] = {"url": store_url}
    config["storage"] = {"root": str(tmp_path / "shared")}
    config["pipeline"]["queue"] = "celery"
    config["pipeline"]["celery"] = {
        "broker_url": rabbitmq_server.url(),
        "queue": f"scale-{free_port()}",
    }
    config_path = tmp_path / "aidx.yaml"
    config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIDX_")}
    processes: dict[str, subprocess.Popen[bytes]] = {}

    def start(name: str, *args: str) -> None:
        processes[name] = subprocess.Popen(
            [*AIDX, "--config", str(config_path), "--data-dir", str(tmp_path / name), *args],
            stdout=(tmp_path / f"{name}.log").open("wb"),
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )

    store = Store(store_url, root=tmp_path / "shared")
    try:
        for name, port in ports.items():
            start(name, "serve", "--single-process", "--no-ui", "--port", str(port))
        for n in range(3):
            start(f"worker-{n}", "worker")
        for name, port in ports.items():
            poll_until(
                lambda port=port: echoscu(LOOPBACK, port, called_aet=NODE_AET).returncode == 0,
                60,
                f"node {name}",
                process=processes[name],
                log_path=tmp_path / f"{name}.log",
            )
        # Orthanc routes half of the study to each node.
        orthanc.upload_dir(chest_study)
        uid = uid_of(chest_study)
        study = orthanc.find_study(uid)
        assert study is not None
        instances = sorted(str(i["ID"]) for i in orthanc.get(f"/studies/{study}/instances"))
        half = len(instances) // 2
        for name, part in (("AIDX_A", instances[:half]), ("AIDX_B", instances[half:])):
            answer = orthanc.post(
                f"/modalities/{name}/store", {"Resources": part, "Synchronous": True}
            )
            assert answer["FailedInstancesCount"] == 0, answer

        def delivered() -> bool:
            counts = instance_counts(study_series(orthanc, uid))
            return counts.get("SR", 0) >= 1 and counts.get("SEG", 0) >= 1

        for n in range(3):
            assert processes[f"worker-{n}"].poll() is None, (
                tmp_path / f"worker-{n}.log"
            ).read_text()
        poll_until(delivered, JOB_DEADLINE_S * 2, "the SR and SEG in Orthanc")
        with store.engine.connect() as conn:
            (job,) = conn.execute(select(jobs)).all()
            assert len(conn.execute(select(results)).all()) == 1
        assert job.study_version == 1 and job.attempts == 1
        counts = instance_counts(study_series(orthanc, uid))
        assert counts == {"CT": len(instances), "SR": 1, "SEG": 1}, counts
        ran = [n for n in range(3) if "results ready" in (tmp_path / f"worker-{n}.log").read_text()]
        assert len(ran) == 1, ran
        # Images and results on the shared root; each process's own folder holds no images.
        shared = tmp_path / "shared"
        assert len(list((shared / "spool").rglob("*.dcm"))) == len(instances)
        assert list((shared / "results").rglob("*.dcm"))
        assert not any((tmp_path / name / "spool").exists() for name in ports)
    finally:
        store.close()
        for process in processes.values():
            stop_process(process)
        orthanc.stop()
