"""Rules of ARCHITECTURE.md that code can check."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO

SERVING = [
    "aidx",
    "aidx.cli",
    "aidx.config",
    "aidx.logs",
    "aidx.store.store",
    "dicom_node",
    "dicom_node.service",
    "inference",
    "inference.volume",
    "inference.series",
    "inference.findings",
    "inference.preprocess",
    "inference.runner",
    "inference.postprocess",
    "inference.sr",
    "inference.seg",
    "inference.pipeline",
    "models.registry",
    "training.dataset",
    "training.converters",
    "training.froc",
    "training.evaluate",
    "training.converters_dicom",
    "aidx.store.jobs",
    "aidx.pipeline.worker",
    "aidx.pipeline.routing",
    "aidx.pipeline.metrics",
    "aidx.cli.pipeline",
    "aidx.cli.status",
    "aidx.cli.users",
    "ui",
    "ui.accounts",
    "ui.audit",
    "ui.viewer",
    "ui.overlays",
    "ui.review",
    "ui.signoff",
    "ui.signed_sr",
    "ui.dashboard",
    "ui.i18n",
    "ui.viewer_session",
    "ui.app",
    "ui.web",
    "aidx.cli.ui",
    "aidx.cli.feedback",
    "training.feedback",
    "models",
]


def test_serving_packages_and_the_phantom_do_not_load_torch_or_monai() -> None:
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in SERVING)
        + "import training.phantom\n"
        + "from training.phantom import make_plan, PhantomOptions\n"
        + "make_plan(PhantomOptions(slices=8, matrix=64, nodules=1, seed=1))\n"
        + "loaded = sorted(m for m in ('torch', 'monai') if m in sys.modules)\n"
        + "assert not loaded, loaded\n"
        + "print('ok')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_training_config_loads() -> None:
    from training.train import TrainConfig

    config = TrainConfig.load(REPO / "configs" / "train" / "phantom.yaml")
    assert config.patch_size == (32, 64, 64)
    assert str(config.dataset) == "aidx-data/datasets/phantoms-train"


def test_torch_is_installed_so_the_check_above_means_something() -> None:
    result = subprocess.run(
        [sys.executable, "-c", "import torch, monai; print(torch.__version__)"],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, "the test environment must have the [train] extra"
