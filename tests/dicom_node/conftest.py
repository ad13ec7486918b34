"""Fixtures for DICOM node tests: a node running in this process on a free port, and small
phantom studies to send to it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from aidx.config import AidxConfig, load_config
from dicom_node.service import NodeService
from tests.peers import free_port, poll_until
from training.phantom import PhantomOptions, generate

NodeFactory = Callable[..., NodeService]


def node_config(data_dir: Path, **overrides: Any) -> AidxConfig:
    """A configuration for tests: free port, no disk floor, short quiet period.

    ``overrides`` use dotted keys with "__" for dots, e.g. ``node__ae_title="X"``.
    """
    values: dict[str, Any] = {
        "data_dir": str(data_dir),
        "node.port": free_port(),
        "node.min_free_disk_mb": 0,
        "node.study_quiet_period_s": 0.5,
        "outbox.initial_backoff_s": 0.2,
        "outbox.max_backoff_s": 1.0,
        "outbox.poll_interval_s": 0.2,
    }
    values.update({k.replace("__", "."): v for k, v in overrides.items()})
    return load_config(env={}, overrides=values)


@pytest.fixture
def start_node(tmp_path: Path) -> Iterator[NodeFactory]:
    """Start nodes with ``start_node(**overrides)``; all are stopped after the test."""
    started: list[NodeService] = []

    def factory(data_dir: Path | None = None, **overrides: Any) -> NodeService:
        config = node_config(data_dir or tmp_path / f"node{len(started)}", **overrides)
        service = NodeService(config)
        service.start()
        started.append(service)
        return service

    yield factory
    for service in started:
        service.stop()
        service.store.close()


@pytest.fixture(scope="session")
def small_study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 12-slice 128² phantom CT study; returns its DICOM folder."""
    out = tmp_path_factory.mktemp("small_study")
    generate(out, PhantomOptions(seed=21, slices=12, matrix=128, nodules=1, workers=1))
    return out / "dicom"


def wait_for(condition: Callable[[], bool], what: str, deadline_s: float = 20.0) -> None:
    """Wait until ``condition()`` holds (bounded polling, not a fixed sleep)."""
    poll_until(condition, deadline_s, what)
