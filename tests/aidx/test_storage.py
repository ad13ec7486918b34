"""storage.root: received images, results and signed reports on a (shared) root apart from the
host's own state; a host that cannot write the root, or does not see the files the store lists
(not mounted, or another root named), refuses to start with the reason (issue 19). A root
mounted at another path serves: tests/aidx/test_relocate.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.peers import LOOPBACK, echoscu, free_port, poll_until, stop_process, storescu
from training.phantom import PhantomOptions, generate

AIDX = [sys.executable, "-m", "aidx"]


def test_images_go_to_the_storage_root_and_a_host_that_does_not_see_it_refuses(
    tmp_path: Path,
) -> None:
    shared, local = tmp_path / "shared", tmp_path / "local"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIDX_")}
    env.update(
        {
            "AIDX_DATA_DIR": str(local),
            "AIDX_STORAGE__ROOT": str(shared),
            "AIDX_METRICS__PORT": "0",
            "AIDX_NODE__STUDY_QUIET_PERIOD_S": "600",
        }
    )
    study = generate(tmp_path / "study", PhantomOptions(slices=20, matrix=64, nodules=0, seed=3))
    log = tmp_path / "node.log"
    command = [*AIDX, "serve", "--single-process", "--workers", "0", "--no-ui"]
    node = subprocess.Popen(
        [*command, "--port", str(port), "--ae-title", "AIDX"],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    try:
        poll_until(
            lambda: echoscu(LOOPBACK, port, called_aet="AIDX").returncode == 0,
            60,
            "the node",
            process=node,
            log_path=log,
        )
        storescu(LOOPBACK, port, [study.dicom_dir], called_aet="AIDX")
    finally:
        stop_process(node)
    assert len(list((shared / "spool").rglob("*.dcm"))) == 20
    assert not (local / "spool").exists()
    assert (local / "aidx.db").is_file()  # the host's own state stays in data_dir

    def worker(root: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*AIDX, "worker"],
            env={**env, "AIDX_STORAGE__ROOT": str(root)},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    # A host that names another root than the one the store's files lie under (or does not
    # mount the share at the root it names): the recorded files are not under its root.
    other = worker(tmp_path / "elsewhere")
    assert other.returncode == 2, other.stderr
    assert "none of the files the store lists last are here" in other.stderr
    assert "set storage.root to the folder where this host mounts the shared root" in other.stderr
    # A root that cannot be written.
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    refused = worker(blocked)
    assert refused.returncode == 2
    assert f"storage.root {blocked} is not writable" in refused.stderr
    assert "Traceback" not in other.stderr + refused.stderr
