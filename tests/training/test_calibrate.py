"""Calibration of finding probabilities: the logistic fit, its refusals, and `aidx calibrate`
registering a calibrated version of a model with the same ONNX file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from aidx.cli import main
from tests.standin_model import install
from training.calibrate import CalibrationError, Samples, fit
from training.converters import phantom_dataset


def test_the_fit_recovers_known_coefficients() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4000, 2)) * [1.5, 2.0] + [2.0, 0.0]
    truth = np.array([-3.0, 1.2, 0.4])
    p = 1 / (1 + np.exp(-(truth[0] + x @ truth[1:])))
    y = rng.random(4000) < p
    intercept, volume_coef, max_coef = fit(Samples(x, y, cases=1, nodules=int(y.sum())))
    assert intercept == pytest.approx(-3.0, abs=0.3)
    assert volume_coef == pytest.approx(1.2, abs=0.15)
    assert max_coef == pytest.approx(0.4, abs=0.1)


def test_one_class_only_is_refused_with_the_reason() -> None:
    x = np.zeros((5, 2))
    with pytest.raises(CalibrationError, match="both nodules and false positives"):
        fit(Samples(x, np.zeros(5, dtype=bool), cases=1, nodules=0))


def test_cli_registers_a_calibrated_version(tmp_path: Path) -> None:
    data = tmp_path / "data"
    models = data / "models"
    models.mkdir(parents=True)
    name = install(models, tmp_path)
    phantom_dataset(
        tmp_path / "cal", 2, seed=11, slices=32, matrix=96, nodules=2, diameter_range=(12.0, 20.0)
    )
    code = main(
        [
            "--data-dir",
            str(data),
            "calibrate",
            "--model",
            f"{name}@0.0.1",
            "--dataset",
            str(tmp_path / "cal"),
            "--version",
            "0.0.2",
        ]
    )
    assert code == 0
    card = json.loads((models / name / "0.0.2" / "card.json").read_text("utf-8"))
    source = json.loads((models / name / "0.0.1" / "card.json").read_text("utf-8"))
    assert card["sha256"] == source["sha256"]  # the same network
    calibration = card["output"]["calibration"]
    assert calibration["segmentation_threshold"] == 0.5
    assert "2 cases" in calibration["fitted_on"]
    assert "aidx calibrate" in card["training"]["command"]


def test_cli_puts_an_evaluation_and_its_threshold_in_the_card(tmp_path: Path) -> None:
    data = tmp_path / "data"
    models = data / "models"
    models.mkdir(parents=True)
    name = install(models, tmp_path)
    phantom_dataset(
        tmp_path / "cal", 2, seed=11, slices=32, matrix=96, nodules=2, diameter_range=(12.0, 20.0)
    )
    common = ["--data-dir", str(data)]
    base = [*common, "calibrate", "--model", f"{name}@0.0.1", "--dataset", str(tmp_path / "cal")]
    assert main([*base, "--version", "0.0.2"]) == 0
    evaluated = main(
        [
            *common,
            "evaluate",
            "--model",
            f"{name}@0.0.2",
            "--dataset",
            str(tmp_path / "cal"),
            "--out",
            str(tmp_path / "eval"),
            "--bootstrap",
            "0",
        ]
    )
    assert evaluated == 0
    froc = tmp_path / "eval" / "froc.json"
    assert main([*base, "--version", "0.0.3", "--evaluation", str(froc)]) == 0
    card = json.loads((models / name / "0.0.3" / "card.json").read_text("utf-8"))
    report = json.loads(froc.read_text("utf-8"))
    assert card["evaluation"]["cpm"] == pytest.approx(report["cpm"])
    assert "operating_fp_per_scan" in card["evaluation"]
    assert 0.0 < card["output"]["operating_threshold"] < 1.0
    (tmp_path / "bad.json").write_text("{}", encoding="utf-8")
    bad = [*base, "--version", "0.0.4", "--evaluation", str(tmp_path / "bad.json")]
    assert main(bad) == 2
