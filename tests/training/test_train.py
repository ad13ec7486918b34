"""The training loop on tiny phantom data: checkpoints, resume, curves, and DDP with two CPU
processes (gloo)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from training.converters import phantom_dataset
from training.train import TrainConfig, train


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("train_data")
    phantom_dataset(
        out / "ds", 2, seed=5, slices=24, matrix=64, nodules=2, diameter_range=(12.0, 20.0)
    )
    return out / "ds"


def config_file(tmp_path: Path, dataset: Path, **changes: object) -> Path:
    data = {
        "dataset": str(dataset),
        "output": str(tmp_path / "run"),
        "features": 4,
        "spacing_mm": [2.5, 2.5, 2.5],
        "patch_size": [16, 32, 32],
        "batch_size": 2,
        "samples_per_case": 2,
        "epochs": 2,
        "validation_fraction": 0.5,
        "validate_every": 1,
    }
    data.update(changes)
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def test_train_checkpoints_curves_and_resume(dataset: Path, tmp_path: Path) -> None:
    config = TrainConfig.load(config_file(tmp_path, dataset))
    history = train(config)
    assert history.epochs == [1, 2]
    assert all(math.isfinite(loss) for loss in history.train_loss)
    assert len(history.val_cpm) == 2 and 0.0 <= history.best_cpm <= 1.0
    run = tmp_path / "run"
    for name in ("checkpoint.pt", "best.pt", "curves.png"):
        assert (run / name).exists(), name
    best = torch.load(run / "best.pt", weights_only=False)
    assert best["network"] == "basic_unet" and best["features"] == 4
    resumed = train(TrainConfig.load(config_file(tmp_path, dataset, epochs=3)), resume=True)
    assert resumed.epochs == [1, 2, 3]
    # The last epoch's weights export as well as the best ones (end of a cosine schedule).
    from training.export import export_checkpoint

    _, card_path, _ = export_checkpoint(
        run / "checkpoint.pt", "tiny", "0.0.1", tmp_path / "export", command="aidx export x"
    )
    card = json.loads(card_path.read_text(encoding="utf-8"))
    assert card["network"].startswith("basic_unet (MONAI), features 4")
    assert card["training"]["command"].endswith("; then aidx export x")


def test_workers_and_a_time_limit_stop_with_a_validated_best_model(
    dataset: Path, tmp_path: Path
) -> None:
    """Workers prepare cases and draw patches; a tiny time limit stops after the first epoch,
    which is validated then (not only every validate_every epochs), so best.pt exists."""
    config = TrainConfig.load(
        config_file(
            tmp_path,
            dataset,
            epochs=50,
            validate_every=40,
            num_workers=2,
            time_limit_minutes=1e-6,
        )
    )
    history = train(config)
    assert history.epochs == [1] and history.val_epochs == [1]
    assert (tmp_path / "run" / "best.pt").exists()


def test_fine_tuning_starts_from_given_weights_with_a_cosine_schedule(
    dataset: Path, tmp_path: Path
) -> None:
    from training.train import _cosine

    (tmp_path / "a").mkdir()
    first = TrainConfig.load(config_file(tmp_path / "a", dataset, epochs=1))
    train(first)
    best = tmp_path / "a" / "run" / "best.pt"
    (tmp_path / "b").mkdir()
    tuned = TrainConfig.load(
        config_file(tmp_path / "b", dataset, epochs=2, init_weights=str(best), lr_schedule="cosine")
    )
    assert train(tuned).epochs == [1, 2]
    from training.export import export_checkpoint

    _, card_path, _ = export_checkpoint(tuned.output / "best.pt", "t", "0.0.2", tmp_path / "x")
    data = json.loads(card_path.read_text(encoding="utf-8"))["training"]["data"]
    assert data.endswith(f"; fine-tuned from the weights in {best}")
    assert [_cosine(tuned, e, 0.0) for e in (1, 2)] == [1.0, 0.5]
    timed = tuned.model_copy(update={"time_limit_minutes": 1.0})
    assert _cosine(timed, 1, 30.0) == pytest.approx(0.5)
    assert _cosine(timed, 1, 600.0) == 0.0


def test_parallel_phantom_generation_gives_the_same_dataset(tmp_path: Path) -> None:
    from training.dataset import Dataset

    one = phantom_dataset(tmp_path / "a", 2, seed=7, slices=16, matrix=64, nodules=1)
    two = phantom_dataset(tmp_path / "b", 2, seed=7, slices=16, matrix=64, nodules=1, workers=2)
    assert [c.id for c in one.cases] == [c.id for c in two.cases]
    loaded = Dataset.load(tmp_path / "b")
    assert [c.lesions for c in loaded.cases] == [c.lesions for c in one.cases]


def test_bad_training_config_names_the_key(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("dataset: x\noutput: y\nepochz: 3\n", encoding="utf-8")
    with pytest.raises(ValueError, match="epochz"):
        TrainConfig.load(path)


def test_ddp_with_two_cpu_processes(dataset: Path, tmp_path: Path) -> None:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    assert torchrun, "torchrun comes with torch"
    config = config_file(tmp_path, dataset, epochs=1, validation_fraction=0.0)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [
            torchrun,
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "training.train",
            "--config",
            str(config),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "run" / "best.pt").exists()


def test_cli_train_export_register(dataset: Path, tmp_path: Path) -> None:
    """`aidx train`, then `aidx export` (verified ONNX + card, registered), then promote."""
    aidx = [str(Path(sys.executable).parent / "aidx"), "--data-dir", str(tmp_path / "data")]
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIDX_")}
    config = config_file(tmp_path, dataset, epochs=1)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*aidx, *args], capture_output=True, text=True, env=env, timeout=300, check=False
        )

    trained = run("train", "--config", str(config))
    assert trained.returncode == 0, trained.stderr[-2000:]
    exported = run(
        "export",
        str(tmp_path / "run" / "best.pt"),
        "--name",
        "phantom-nodule",
        "--version",
        "0.0.1",
    )
    assert exported.returncode == 0, exported.stderr[-2000:]
    assert "exported and verified" in exported.stdout and "max abs" in exported.stdout
    assert run("models", "promote", "phantom-nodule@0.0.1").returncode == 0
    shown = run("models", "show", "phantom-nodule")
    assert '"synthetic": true' in shown.stdout and '"patch_size"' in shown.stdout


def test_positive_patch_centres_are_balanced_per_lesion_not_per_voxel() -> None:
    import numpy as np

    from training.train import CENTRES_PER_LESION, _lesion_balanced_centres

    label = np.zeros((24, 24, 24), dtype=np.uint8)
    label[2:4, 2:4, 2:4] = 1  # 8 voxels
    label[10:20, 10:20, 10:20] = 1  # 1 000 voxels
    centres = _lesion_balanced_centres(label, np.random.default_rng(0))
    z = np.unravel_index(centres, label.shape)[0]
    assert len(centres) == 2 * CENTRES_PER_LESION
    assert (z < 5).sum() == (z >= 10).sum() == CENTRES_PER_LESION
    assert label.ravel()[centres].all()
    assert len(_lesion_balanced_centres(np.zeros((4, 4, 4)), np.random.default_rng(0))) == 0


def test_small_lesions_get_more_positive_centres() -> None:
    import numpy as np

    from training.train import CENTRES_PER_LESION, _lesion_balanced_centres

    label = np.zeros((20, 40, 40), dtype=np.uint8)
    label[2:4, 2:4, 2:4] = 1  # 8 voxels of 1 mm³: a 2.5 mm sphere's volume
    label[8:18, 10:30, 10:30] = 1  # 4 000 mm³
    centres = _lesion_balanced_centres(label, np.random.default_rng(0), 3, 1.0)
    small = np.unravel_index(centres, label.shape)[0] < 5
    assert small.sum() == 3 * CENTRES_PER_LESION and (~small).sum() == CENTRES_PER_LESION
    assert label.ravel()[centres].all()


class _Thresholder(torch.nn.Module):
    """A 'network' that calls every voxel brighter than 0.5 a lesion (logit > 0 there)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - 0.5) * 100.0


def test_hard_negatives_are_the_starting_networks_false_positives(
    dataset: Path, tmp_path: Path
) -> None:
    from scipy import ndimage

    from models.networks import ProbabilityNet
    from training.train import HARD_NEGATIVE_MARGIN, _mine_hard_negatives, prepare_cases

    config = TrainConfig.load(
        config_file(tmp_path, dataset, hard_negative_fraction=0.25, init_weights="w.pt")
    )
    cases = prepare_cases(config)
    before = [case.item["bg"].size for case in cases]
    net = ProbabilityNet(_Thresholder())
    assert _mine_hard_negatives(net, cases, config, torch.device("cpu")) > 0
    for case, n_bg in zip(cases, before, strict=True):
        image, label = case.item["image"][0], case.item["label"][0]
        hard = case.item["bg"][n_bg:]
        near = ndimage.binary_dilation(label > 0, iterations=HARD_NEGATIVE_MARGIN).ravel()
        assert (image.ravel()[hard] >= 0.5).all() and not near[hard].any()
        assert hard.size / case.item["bg"].size == pytest.approx(0.25, abs=0.05)


def test_hard_negatives_need_starting_weights(dataset: Path, tmp_path: Path) -> None:
    path = config_file(tmp_path, dataset, hard_negative_fraction=0.5)
    with pytest.raises(ValueError, match="hard_negative_fraction needs init_weights"):
        TrainConfig.load(path)


@pytest.mark.parametrize(
    "path",
    sorted((Path(__file__).resolve().parents[2] / "configs" / "train").glob("*.yaml")),
    ids=lambda p: p.name,
)
def test_every_shipped_training_config_is_valid(path: Path) -> None:
    config = TrainConfig.load(path)  # raises, naming the key, on a bad or unknown key
    if config.hard_negative_fraction > 0:
        assert config.init_weights is not None  # mining needs a starting network
