"""`aidx dataset phantoms` and `aidx evaluate` end to end, through the serving path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

from tests.inference.test_infer_cli import card, soft_tissue_model


def test_dataset_then_evaluate(tmp_path: Path) -> None:
    aidx = [str(Path(sys.executable).parent / "aidx"), "--data-dir", str(tmp_path / "data")]
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIDX_")}
    env["AIDX_MODELS__DEFAULT"] = "soft-tissue"

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*aidx, *args], capture_output=True, text=True, env=env, check=False)

    made = run(
        "dataset",
        "phantoms",
        str(tmp_path / "ds"),
        "--cases",
        "2",
        "--seed",
        "3",
        "--slices",
        "24",
        "--matrix",
        "96",
    )
    assert made.returncode == 0, made.stderr
    dataset = json.loads((tmp_path / "ds" / "dataset.json").read_text(encoding="utf-8"))
    assert len(dataset["cases"]) == 2
    model = soft_tissue_model(tmp_path / "m.onnx")
    (tmp_path / "card.json").write_text(json.dumps(card(model)), encoding="utf-8")
    assert (
        run("models", "register", str(model), "--card", str(tmp_path / "card.json")).returncode == 0
    )
    assert run("models", "promote", "soft-tissue@0.0.1").returncode == 0
    result = run(
        "evaluate",
        "--dataset",
        str(tmp_path / "ds"),
        "--out",
        str(tmp_path / "eval"),
        "--bootstrap",
        "10",
    )
    assert result.returncode == 0, result.stderr
    assert "CPM" in result.stdout
    report = json.loads((tmp_path / "eval" / "froc.json").read_text(encoding="utf-8"))
    lesions = sum(len(c["lesions"]) for c in dataset["cases"])
    assert report["n_scans"] == 2 and report["n_nodules"] == lesions
    assert 0.0 <= report["cpm"] <= 1.0
    with Image.open(tmp_path / "eval" / "froc.png") as png:
        assert png.size[0] > 100
    detections = (tmp_path / "eval" / "detections.csv").read_text("utf-8").splitlines()
    assert detections[0] == "seriesuid,coordX,coordY,coordZ,probability"
    assert {row.split(",")[0] for row in detections[1:]} <= {c["id"] for c in dataset["cases"]}
    # Two evaluations of one dataset compared (here the same one twice: no difference).
    compared = run(
        "compare",
        str(tmp_path / "eval"),
        str(tmp_path / "eval"),
        "--dataset",
        str(tmp_path / "ds"),
        "--bootstrap",
        "50",
        "--out",
        str(tmp_path / "compare.json"),
    )
    assert compared.returncode == 0, compared.stderr
    assert "B - A: +0.000" in compared.stdout
    assert json.loads((tmp_path / "compare.json").read_text("utf-8"))["difference"] == 0.0
    no_csv = run(
        "compare", str(tmp_path / "ds"), str(tmp_path / "eval"), "--dataset", str(tmp_path / "ds")
    )
    assert no_csv.returncode == 1 and "evaluate again" in no_csv.stderr
    missing = run("evaluate", "--dataset", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x"))
    assert missing.returncode == 1 and "aidx evaluate:" in missing.stderr


def test_card_figures_from_a_froc_report() -> None:
    from training.evaluate import EVALUATION_BANDS
    from training.froc import Detection, Nodule, Scan
    from training.froc import evaluate as froc
    from training.froc_io import evaluation_figures

    scans = [
        Scan("a", (Nodule((0, 0, 0), 8.0), Nodule((50, 0, 0), 4.0)), (Detection((0, 0, 0), 0.9),)),
        Scan("b", (Nodule((0, 0, 0), 12.0),), (Detection((90, 0, 0), 0.8),)),
    ]
    report = froc(scans, size_bands=EVALUATION_BANDS, bootstrap=20)
    figures = evaluation_figures(report.to_json())
    assert figures["cpm"] == report.cpm
    assert figures["scans"] == 2 and figures["nodules"] == 3
    assert figures["sensitivity_at_1_fp_per_scan"] == report.sensitivities[3]
    assert figures["sensitivity_6-100mm_at_1_fp_per_scan"] == 0.5  # 8 mm found, 12 mm missed
    assert figures["cpm_ci_low"] <= report.cpm <= figures["cpm_ci_high"]
