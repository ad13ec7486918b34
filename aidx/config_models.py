"""The ``models:`` section of the configuration: where models live, the default one, the
promotion gate (``aidx models promote``, docs/models/promoting.md) and the drift alert
(``aidx.pipeline.drift``). Apart from :mod:`aidx.config` to keep that module short."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from aidx.config_base import StrictModel


class GateConfig(StrictModel):
    """The promotion gate (docs/models/promoting.md); off while ``dataset`` is unset."""

    dataset: Path | None = None  # the frozen evaluation set (a dataset.json folder)
    margin: float = Field(default=0.05, ge=0, lt=1)  # non-inferiority: CPM and sensitivity
    fp_margin: float = Field(default=0.5, ge=0)  # more false positives per study allowed
    min_shadow_studies: int = Field(default=20, ge=0)  # signed studies read in shadow
    bootstrap: int = Field(default=1000, ge=100, le=100_000)


class DriftConfig(StrictModel):
    """The drift alert of /metrics (aidx.pipeline.drift); off while min_acceptance is unset."""

    min_acceptance: float | None = Field(default=None, gt=0, le=1)
    window_days: float = Field(default=7.0, gt=0)
    min_decided: int = Field(default=20, ge=1)  # AI findings decided in the window


class ModelsConfig(StrictModel):
    dir: Path | None = None
    default: str = Field(default="lung-nodule", pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")
    gate: GateConfig = Field(default_factory=GateConfig)
    drift: DriftConfig = Field(default_factory=DriftConfig)
