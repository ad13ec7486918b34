"""Training the two-stage detector's classifier: labels, a resumable run, the ONNX export."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from training.detector import (
    CROP,
    export_classifier,
    label_candidates,
    train,
)


def test_candidates_are_labelled_by_the_hit_rule_and_near_misses_dropped() -> None:
    centres = np.array([[0.0, 0.0, 0.0], [50.0, 0.0, 0.0]])
    diameters = np.array([10.0, 4.0])
    points = np.array(
        [
            [3.0, 0.0, 0.0],  # inside the first
            [50.0, 1.5, 0.0],  # inside the second
            [0.0, 6.0, 0.0],  # 1 mm beyond the first's radius: ambiguous
            [20.0, 20.0, 20.0],  # far from both
        ]
    )
    label, diameter, keep = label_candidates(points, centres, diameters)
    assert label.tolist() == [1, 1, 0, 0]
    assert diameter.tolist() == [10.0, 4.0, 0.0, 0.0]
    assert keep.tolist() == [True, True, False, True]


def fake_crops(folder: Path) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    n = 24
    label = (np.arange(n) % 3 == 0).astype(np.int8)
    crops = rng.integers(0, 60, size=(n, 2, CROP, CROP, CROP), dtype=np.uint8)
    crops[label == 1, :, 12:20, 12:20, 12:20] = 200  # a bright blob in the middle
    np.savez_compressed(
        folder / "case.npz",
        crops=crops,
        label=label,
        diameter=np.where(label == 1, 8.0, 0.0).astype(np.float32),
        source=np.zeros(n, dtype=np.int8),
    )


def test_training_resumes_and_the_export_matches_pytorch(tmp_path: Path) -> None:
    fake_crops(tmp_path / "crops")
    checkpoint = train(tmp_path, minutes=0.02, resume=False, batch_size=8)
    import torch

    first = torch.load(checkpoint, weights_only=False)
    assert first["step"] >= 1
    train(tmp_path, minutes=0.02, resume=True, batch_size=8)
    second = torch.load(checkpoint, weights_only=False)
    assert second["step"] > first["step"] and second["spent_s"] > first["spent_s"]
    target = tmp_path / "classifier.onnx"
    diff = export_classifier(checkpoint, target)
    assert diff < 1e-3
    session = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    scores = session.run(None, {"crops": np.zeros((3, 2, CROP, CROP, CROP), np.float32)})[0]
    assert scores.shape == (3, 2)
    assert np.all((scores[:, 0] > 0) & (scores[:, 0] < 1)) and np.all(scores[:, 1] > 0)


def test_training_without_crops_says_what_to_run(tmp_path: Path) -> None:
    (tmp_path / "crops").mkdir()
    with pytest.raises(SystemExit, match=r"run `python -m training\.detector extract` first"):
        train(tmp_path, minutes=0.01, resume=False)


@pytest.mark.parametrize("shard", ["2/2", "x", "1/0"])
def test_a_bad_shard_is_refused_with_the_form_it_takes(
    shard: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from training.detector import main

    with pytest.raises(SystemExit) as stop:
        main(["extract", str(tmp_path), str(tmp_path / "out"), "--shard", shard])
    assert stop.value.code == 2
    assert "--shard takes K/N with 0 <= K < N" in capsys.readouterr().err


def test_every_nodule_gets_the_same_share_of_positive_samples() -> None:
    from training.detector import nodule_weights

    diameters = np.array([20.0] * 30 + [3.5] * 2 + [7.0] * 8, dtype=np.float32)
    w = nodule_weights(diameters)
    assert w.sum() == pytest.approx(1.0)
    shares = {d: float(w[diameters == d].sum()) for d in (20.0, 3.5, 7.0)}
    assert shares == pytest.approx({20.0: 1 / 3, 3.5: 1 / 3, 7.0: 1 / 3})


def froc(cpm: float, fps: list[float], thresholds: list[float]) -> dict[str, object]:
    return {
        "cpm": cpm,
        "n_scans": 20,
        "n_nodules": 39,
        "operating_points": [1.0],
        "sensitivities": [cpm],
        "curve": {"fps": fps, "thresholds": thresholds},
        "band_fp_rate": 1.0,
        "size_bands": [{"low_mm": 3.0, "high_mm": 6.0, "sensitivity": 0.5}],
    }


def test_the_export_is_a_registrable_model_with_figures_and_a_threshold_chosen_elsewhere(
    tmp_path: Path,
) -> None:
    import json

    from models.registry import ModelCard, verify
    from training.detector import _resolve, default_spec, export

    base = _resolve("lung-nodule@0.5.0")
    run = tmp_path / "run"
    fake_crops(run / "crops")
    (run / "spec.json").write_text(default_spec(base.card).model_dump_json(), encoding="utf-8")
    train(run, minutes=0.01, resume=False, batch_size=8)
    held_out, selection = tmp_path / "held-out.json", tmp_path / "selection.json"
    held_out.write_text(json.dumps(froc(0.8, [0.5, 1.0, 2.0], [0.9, 0.7, 0.2])), "utf-8")
    selection.write_text(json.dumps(froc(0.7, [0.5, 1.0, 2.0], [0.8, 0.6, 0.1])), "utf-8")
    folder = export(
        run,
        base,
        tmp_path / "models",
        "9.9.9",
        "the command",
        evaluation=held_out,
        threshold_from=selection,
        augment_top=16,
        max_candidates=1234,
        network_overlap=0.0,
    )
    card = ModelCard.load(folder / "card.json")
    verify(card, folder / "model.onnx")
    assert card.version == "9.9.9" and card.detector is not None
    assert card.output.operating_threshold == pytest.approx(0.6)  # the selection set's
    assert card.evaluation["cpm"] == pytest.approx(0.8)  # the held-out set's
    assert card.detector.classifier.augment_top == 16
    assert card.detector.candidates.max_candidates == 1234
    assert card.detector.candidates.network_overlap == 0.0
    assert card.training.synthetic and card.training.command == "the command"


def test_a_nodule_under_6_mm_gets_the_small_weight_in_shares() -> None:
    from training.detector import nodule_weights

    diameters = np.array([20.0] * 30 + [3.5] * 2 + [7.0] * 8, dtype=np.float32)
    w = nodule_weights(diameters, small_weight=2.0)
    shares = {d: float(w[diameters == d].sum()) for d in (20.0, 3.5, 7.0)}
    assert shares == pytest.approx({20.0: 1 / 4, 3.5: 2 / 4, 7.0: 1 / 4})


def test_in_plane_augmentation_keeps_the_slice_axis_first() -> None:
    from training.detector import augment

    # a crop whose values change along the slices only
    x = np.broadcast_to(np.arange(8, dtype=np.float32)[:, None, None], (8, 8, 8))
    batch = np.ascontiguousarray(np.broadcast_to(x, (2, 2, 8, 8, 8)))
    rng = np.random.default_rng(3)
    moved = 0
    for _ in range(30):
        kept = augment(batch, rng, "in-plane")
        assert np.ptp(kept, axis=(3, 4)).max() == 0  # still constant within each slice
        assert sorted(np.unique(kept[0, 0, :, 0, 0])) == list(range(8))
        moved += int(np.ptp(augment(batch, rng, "all"), axis=(3, 4)).max() > 0)
    assert moved > 0  # all six orders: the slice axis goes elsewhere too


SHIPPED_CLASSIFIER = Path("models/shipped/lung-nodule/0.7.0/classifier.onnx")


def test_a_network_read_back_from_onnx_is_the_shipped_function_while_it_trains() -> None:
    import torch

    from training.classifier_net import freeze_norms, from_onnx

    net = from_onnx(SHIPPED_CLASSIFIER)
    net.train()
    freeze_norms(net)  # training mode, the normalisations held: the function is unchanged
    x = np.random.default_rng(1).random((6, 2, CROP, CROP, CROP), dtype=np.float32)
    with torch.no_grad():
        out = net(torch.from_numpy(x)).numpy()
    session = ort.InferenceSession(str(SHIPPED_CLASSIFIER), providers=["CPUExecutionProvider"])
    expected = session.run(None, {"crops": x})[0]
    assert np.abs(1 / (1 + np.exp(-out[:, 0])) - expected[:, 0]).max() < 1e-5
    assert np.abs(np.exp(out[:, 1]) - expected[:, 1]).max() < 1e-3


def test_another_onnx_graph_is_refused_by_name() -> None:
    from training.classifier_net import from_onnx

    with pytest.raises(ValueError, match=r"model\.onnx: not a classifier of this design"):
        from_onnx(Path("models/shipped/lung-nodule/0.5.0/model.onnx"))


def test_a_run_from_a_shipped_classifier_resumes_with_its_schedule(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import torch

    from training.detector import Schedule

    fake_crops(tmp_path / "crops")
    schedule = Schedule(learning_rate=5e-4, small_weight=2.0, init_from=SHIPPED_CLASSIFIER)
    checkpoint = train(tmp_path, minutes=0.02, resume=False, batch_size=8, schedule=schedule)
    first = torch.load(checkpoint, weights_only=False)
    assert first["schedule"] == {
        "learning_rate": 5e-4,
        "small_weight": 2.0,
        "init_from": SHIPPED_CLASSIFIER,
        "axes": "all",
    }
    # resumed with other options: the run's own schedule, said so, and its own weights
    with caplog.at_level(logging.WARNING, logger="aidx.training"):
        train(tmp_path, minutes=0.02, resume=True, batch_size=8, schedule=Schedule())
    assert "a resumed run keeps the schedule it started with" in caplog.text
    second = torch.load(checkpoint, weights_only=False)
    assert second["schedule"] == first["schedule"] and second["step"] > first["step"]
    assert export_classifier(checkpoint, tmp_path / "classifier.onnx") < 1e-3


def test_init_from_a_model_without_a_classifier_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from training.detector import main

    with pytest.raises(SystemExit) as stop:
        main(["train", str(tmp_path), "--init-from", "lung-nodule@0.5.0"])
    assert stop.value.code == 2
    assert "--init-from lung-nodule@0.5.0: not a two-stage detector" in capsys.readouterr().err
