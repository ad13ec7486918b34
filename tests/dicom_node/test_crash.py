"""Crash safety of the storage SCP: ``aidx serve`` killed with SIGKILL in mid-transfer loses
no instance that was acknowledged, and a restart plus a re-send completes the study once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path

import pytest
from pydicom import dcmread

from aidx.config import AidxConfig
from aidx.store.store import Store, instances, jobs
from tests.conftest import require_tool
from tests.dicom_node.senders import NODE_AET, storescu_responses
from tests.peers import (
    LOOPBACK,
    echoscu,
    free_port,
    peer_env,
    poll_until,
    start_process,
    stop_process,
    storescu,
    storescu_command,
)
from training.phantom import PhantomOptions, generate

AIDX = Path(sys.executable).with_name("aidx")


# ---------------------------------------------------------------------- 4. crash safety
class NodeProcess:
    """``aidx serve`` in a subprocess on a data dir, ready once a C-ECHO succeeds."""

    def __init__(self, data_dir: Path, port: int, log_path: Path) -> None:
        self.data_dir = data_dir
        self.port = port
        self.log_path = log_path
        # No inference workers: this tests the node (the pipeline tests run workers).
        command = [
            *(str(AIDX), "--data-dir", str(data_dir), "serve", "--port", str(port)),
            *("--workers", "0", "--metrics-port", "0", "--no-ui", "--single-process"),
        ]
        self.process = start_process(command, log_path)
        poll_until(
            lambda: echoscu(LOOPBACK, port, called_aet=NODE_AET).returncode == 0,
            30.0,
            "aidx serve answering C-ECHO",
            process=self.process,
            log_path=log_path,
        )

    def kill(self) -> None:
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        stop_process(self.process)


def _acknowledged(lines: Iterable[str]) -> list[str]:
    """Files that got a success response, from ``storescu -v`` output lines."""
    return [
        path for path, answer in storescu_responses("\n".join(lines)).items() if answer == "Success"
    ]


def test_kill_9_mid_transfer_loses_no_acknowledged_instance(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``aidx serve`` killed with SIGKILL while DCMTK sends 300 slices: after a restart every
    instance that got a success status is stored whole and indexed once, no temporary file
    is left, and a full re-send completes the study once, with one job."""
    require_tool("storescu", "dcmtk")
    assert AIDX.is_file(), f"{AIDX} not found: install the project (pip install -e .)"
    phantom = tmp_path / "phantom"
    generate(phantom, PhantomOptions(seed=5, slices=300, matrix=128, nodules=0, workers=2))
    files = sorted((phantom / "dicom").glob("*.dcm"))
    assert len(files) == 300
    sop_of = {str(f): str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    study_uid = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    data_dir = tmp_path / "data"
    port = free_port()
    for name in [n for n in os.environ if n.startswith("AIDX_")]:
        monkeypatch.delenv(name)  # only the settings below reach the node
    monkeypatch.setenv("AIDX_NODE__MIN_FREE_DISK_MB", "0")
    monkeypatch.setenv("AIDX_NODE__STUDY_QUIET_PERIOD_S", "60")

    node = NodeProcess(data_dir, port, tmp_path / "node1.log")
    lines: list[str] = []
    enough = threading.Event()
    sender = subprocess.Popen(
        storescu_command(
            LOOPBACK, port, [phantom / "dicom"], called_aet=NODE_AET, extra_args=["-v"]
        ),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=peer_env(),
    )

    def read_output() -> None:
        assert sender.stderr is not None
        successes = 0
        for line in sender.stderr:
            lines.append(line.rstrip("\n"))
            if "Received Store Response (Success)" in line:
                successes += 1
                if successes >= 100:
                    enough.set()
        enough.set()  # storescu ended (it should not before the kill)

    reader = threading.Thread(target=read_output, daemon=True)
    reader.start()
    try:
        assert enough.wait(60), "storescu got no 100 success responses within 60 s"
        # Aim the kill at a write in progress (a temporary file exists) if one shows up soon.
        catch_write_until = time.monotonic() + 2.0
        incoming = data_dir / "spool" / ".incoming"
        while time.monotonic() < catch_write_until and not any(incoming.rglob("*.part")):
            pass
        node.kill()
        sender.wait(30)
        reader.join(10)
    finally:
        node.stop()
        if sender.poll() is None:
            sender.kill()
            sender.wait(10)
    acknowledged = {sop_of[path] for path in _acknowledged(lines)}
    assert 100 <= len(acknowledged) < 300, f"killed too late: {len(acknowledged)} acknowledged"
    spool = data_dir / "spool"
    partial = list((spool / ".incoming").rglob("*.part"))
    on_disk = len(list(spool.glob("*/*/*.dcm")))
    store = Store.for_config(AidxConfig(data_dir=data_dir))
    indexed = store.count(instances)
    store.close()
    with capsys.disabled():
        print(
            f"\nkill -9 after {len(acknowledged)} success responses: {on_disk} files in the "
            f"spool, {indexed} indexed, {len(partial)} partial files"
        )

    # Restart on the same data dir: every acknowledged instance is there, whole and indexed.
    # Shorter now (the open study must follow), but longer than restart + checks + re-send
    # start, or a re-indexed instance could complete the study before the re-send reopens it.
    monkeypatch.setenv("AIDX_NODE__STUDY_QUIET_PERIOD_S", "8")
    node = NodeProcess(data_dir, port, tmp_path / "node2.log")
    store = Store.for_config(AidxConfig(data_dir=data_dir))
    try:
        assert list((spool / ".incoming").rglob("*.part")) == []
        log = node.log_path.read_text()
        if partial:
            assert f"removed {len(partial)} partial files" in log, log
        if on_disk > indexed:
            assert f"re-indexed {on_disk - indexed} files" in log, log
        rows = {row["sop_uid"]: row for row in store.study_instances(study_uid)}
        assert len(rows) == store.count(instances) == on_disk
        missing = acknowledged - set(rows)
        assert missing == set(), f"{len(missing)} acknowledged instances lost"
        for sop_uid in acknowledged:
            ds = dcmread(rows[sop_uid]["path"])
            assert str(ds.SOPInstanceUID) == sop_uid
            assert ds.pixel_array.shape == (128, 128)
        stored = sorted(str(p) for p in spool.glob("*/*/*.dcm"))
        assert stored == sorted(str(row["path"]) for row in rows.values())
        study = store.study(study_uid)
        assert study is not None and study["instance_count"] == len(rows)

        # Re-send everything: 300 indexed once, one completion, one job.
        result = storescu(LOOPBACK, port, [phantom / "dicom"], called_aet=NODE_AET)
        assert result.returncode == 0, result.stdout + result.stderr
        poll_until(
            lambda: len(store.study_jobs(study_uid)) == 1,
            30.0,
            "the study completing",
            process=node.process,
            log_path=node.log_path,
        )
        study = store.study(study_uid)
        assert study is not None
        assert (study["state"], study["version"], study["instance_count"]) == (
            "complete",
            1,
            300,
        )
        assert store.count(instances) == 300
        assert len({row["sop_uid"] for row in store.study_instances(study_uid)}) == 300
        assert len(list(spool.glob("*/*/*.dcm"))) == 300
        assert store.next_completion() is None  # nothing left open: no further job
        assert store.count(jobs) == 1
    finally:
        store.close()
        node.stop()
    assert node.process.returncode == 0, (tmp_path / "node2.log").read_text()
