"""Fixtures for the pipeline tests: the stand-in model registry, and small phantom studies
(generated once per session; each test has its own Orthanc and its own aidx data folder, so
they can share the studies' UIDs)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_tool
from tests.pipeline.harness import Pipeline
from tests.standin_model import install
from tests.study_copies import study_copies
from training.phantom import NoduleRequest, PhantomOptions, generate

# Ten routine-sized studies for the queue test: enough slices for inference.series.min_slices
# (20), small enough that ten of them run in seconds with the stand-in model.
QUEUE_STUDIES = 10


@pytest.fixture(autouse=True)
def _peers() -> None:
    """Every test here runs Orthanc; the queue test also sends with DCMTK storescu."""
    require_tool("Orthanc", "orthanc")
    require_tool("storescu", "dcmtk")


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model registry holding the stand-in "soft-tissue" model, active (read-only for tests)."""
    root = tmp_path_factory.mktemp("standin")
    registry = root / "registry"
    assert install(registry, root) == "soft-tissue"
    return registry


PipelineFactory = Callable[..., Pipeline]


@pytest.fixture
def new_pipeline(tmp_path: Path, models_dir: Path) -> Iterator[PipelineFactory]:
    """``new_pipeline(**options)``: an `aidx serve` setup in this test's folder (options as in
    `tests.pipeline.harness.pipeline_config`); its store connection is closed afterwards."""
    made: list[Pipeline] = []

    def factory(**options: Any) -> Pipeline:
        pipeline = Pipeline(tmp_path / f"aidx{len(made)}", models_dir, **options)
        made.append(pipeline)
        return pipeline

    yield factory
    for pipeline in made:
        pipeline.close()


def _phantom(out: Path, seed: int, slices: int, matrix: int) -> Path:
    result = generate(
        out,
        PhantomOptions(
            seed=seed,
            slices=slices,
            matrix=matrix,
            slice_thickness=2.5,
            nodule_requests=(NoduleRequest(14.0, "solid", "isolated", "smooth"),),
            workers=1,
        ),
    )
    return Path(result.dicom_dir)


@pytest.fixture(scope="session")
def chest_study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 30-slice 96² phantom CT with one 14 mm nodule; returns its DICOM folder."""
    return _phantom(tmp_path_factory.mktemp("chest"), seed=5, slices=30, matrix=96)


@pytest.fixture(scope="session")
def short_study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 10-slice phantom: fewer slices than inference.series.min_slices (20)."""
    return _phantom(tmp_path_factory.mktemp("short"), seed=7, slices=10, matrix=64)


@pytest.fixture(scope="session")
def queue_studies(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Ten distinct 24-slice 64² studies: one phantom under ten sets of UIDs."""
    root = tmp_path_factory.mktemp("queue")
    phantom = _phantom(root / "phantom", seed=100, slices=24, matrix=64)
    return study_copies(phantom, root / "studies", QUEUE_STUDIES)
