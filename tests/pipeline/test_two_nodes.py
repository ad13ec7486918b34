"""Two DICOM receivers on one store (PostgreSQL): a study whose instances arrive at both is
assembled once, by whichever node's assembler sees it settle first in the store; a late
instance at either node reopens it, and it is assembled once again (issue 19)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from sqlalchemy import select

from aidx.store.schema import events, jobs, studies
from aidx.store.store import Store
from tests.peers import LOOPBACK, echoscu, free_port, poll_until, stop_process, storescu
from training.phantom import PhantomOptions, generate

AIDX = [sys.executable, "-m", "aidx"]
NODE_AET = "AIDX"


def start_node(tmp_path: Path, name: str, store_url: str) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIDX_")}
    env.update(
        {
            "AIDX_DATA_DIR": str(tmp_path / name),  # each node its own spool
            "AIDX_STORE__URL": store_url,
            "AIDX_NODE__STUDY_QUIET_PERIOD_S": "2",
            "AIDX_METRICS__PORT": "0",
        }
    )
    command = [*AIDX, "serve", "--single-process", "--workers", "0", "--no-ui"]
    command += ["--port", str(port), "--ae-title", NODE_AET]
    log = (tmp_path / f"{name}.log").open("wb")
    process = subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    poll_until(
        lambda: echoscu(LOOPBACK, port, called_aet=NODE_AET).returncode == 0,
        60,
        f"node {name} answering",
        process=process,
        log_path=tmp_path / f"{name}.log",
    )
    return process, port


def rows(store: Store, table: Any) -> list[Any]:
    with store.engine.connect() as conn:
        return list(conn.execute(select(table)))


def test_a_study_split_across_two_nodes_is_assembled_once_and_reopened_once(
    tmp_path: Path, postgres_server: Any
) -> None:
    url = postgres_server.new_database()
    files = sorted(
        generate(
            tmp_path / "study", PhantomOptions(slices=21, matrix=64, nodules=0, seed=19)
        ).dicom_dir.rglob("*.dcm")
    )
    first, second, late = files[:10], files[10:20], files[20:]
    (a, port_a), (b, port_b) = start_node(tmp_path, "a", url), start_node(tmp_path, "b", url)
    store = Store(url)
    try:
        storescu(LOOPBACK, port_a, first, called_aet=NODE_AET)
        storescu(LOOPBACK, port_b, second, called_aet=NODE_AET)
        poll_until(lambda: len(rows(store, jobs)) >= 1, 60, "the study complete")
        (study,) = rows(store, studies)
        assert (study.instance_count, study.state, study.version) == (20, "complete", 1)
        # A late instance at the other node reopens it; it settles and is assembled once more.
        storescu(LOOPBACK, port_a, late, called_aet=NODE_AET)
        poll_until(lambda: len(rows(store, jobs)) >= 2, 60, "the study complete again")
        (study,) = rows(store, studies)
        assert (study.instance_count, study.state, study.version) == (21, "complete", 2)
        assert sorted(j.study_version for j in rows(store, jobs)) == [1, 2]
        completions = [e for e in rows(store, events) if e.event == "complete"]
        assert len(completions) == 2
    finally:
        store.close()
        stop_process(a)
        stop_process(b)
    for name in ("a", "b"):
        text = (tmp_path / f"{name}.log").read_text("utf-8", errors="replace")
        assert "Traceback" not in text and " ERROR " not in text, text[-2000:]
