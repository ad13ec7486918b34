"""The spool's temporary files on a spool that several nodes may share (storage.root on a
shared mount): a node removes at start only what a dead writer of its own host left."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from dicom_node.spool import Spool


def test_only_leftovers_of_dead_writers_on_this_host_are_removed(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", 0)
    other_host = spool.incoming.parent / "another-host"
    other_host.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        gone = subprocess.run(
            [sys.executable, "-c", "import os; print(os.getpid())"],
            capture_output=True,
            text=True,
            check=True,
        )
        dead_pid = int(gone.stdout)
        live = spool.incoming / f"1.2.3.{sleeper.pid}.{'a' * 32}.part"
        dead = spool.incoming / f"1.2.4.{dead_pid}.{'b' * 32}.part"
        own = spool.incoming / f"1.2.5.{os.getpid()}.{'c' * 32}.part"  # a previous life's pid
        legacy = spool.incoming.parent / f"1.2.6.{'d' * 32}.part"  # one node, older layout
        remote = other_host / f"1.2.7.{dead_pid}.{'e' * 32}.part"
        for path in (live, dead, own, legacy, remote):
            path.write_bytes(b"partial")
        assert spool.remove_partial_files() == 3
        assert live.exists() and remote.exists()
        assert not (dead.exists() or own.exists() or legacy.exists())
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_stored_file_goes_through_this_hosts_folder_and_leaves_nothing_there(
    tmp_path: Path,
) -> None:
    spool = Spool(tmp_path / "spool", 0)
    path = spool.store("1.2", "1.2.3", "1.2.3.4", b"DICM", memoryview(b"data"))
    assert path.read_bytes() == b"DICMdata"
    assert spool.incoming.parent.name == ".incoming" and list(spool.incoming.iterdir()) == []
