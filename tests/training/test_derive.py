"""A serving variant of a shipped two-stage detector: the same networks, other settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from models.registry import ModelCard, Registry, sha256_of
from tests.training.test_detector_training import froc
from training.derive import DeriveError, derive, main
from training.detector import _resolve

BASE = "lung-nodule@0.6.1"


def test_a_variant_has_the_base_networks_its_settings_and_figures_chosen_elsewhere(
    tmp_path: Path,
) -> None:
    base = _resolve(BASE)
    held_out, selection = (
        froc(0.8, [0.5, 1.0, 2.0], [0.9, 0.7, 0.2]),
        froc(0.7, [0.5, 1.0, 2.0], [0.8, 0.6, 0.1]),
    )
    folder = derive(
        base,
        tmp_path,
        "9.9.9",
        {"background_mm": 13, "max_candidates": 300},
        "the command",
        evaluation=held_out,
        threshold_from=selection,
    )
    card = ModelCard.load(folder / "card.json")
    assert card.detector is not None and base.card.detector is not None
    for name in ("model.onnx", base.card.detector.classifier.file):
        assert sha256_of(folder / name) == sha256_of(base.folder / name)
    assert card.detector.candidates.background_mm == 13.0
    assert card.detector.candidates.max_candidates == 300
    assert card.detector.candidates.network == base.card.detector.candidates.network
    assert card.output.operating_threshold == pytest.approx(0.6)  # the selection set's
    assert card.evaluation["cpm"] == pytest.approx(0.8)  # the held-out set's
    assert card.training.command.endswith("then: the command")
    entry = Registry(tmp_path, ()).resolve("lung-nodule@9.9.9", "lung-nodule")
    assert entry.card.sha256 == base.card.sha256  # the registry verifies the copied network


def test_without_figures_the_variant_keeps_the_threshold_and_claims_no_figures(
    tmp_path: Path,
) -> None:
    base = _resolve(BASE)
    folder = derive(base, tmp_path, "9.9.9", {"background_mm": 13}, "c")
    card = ModelCard.load(folder / "card.json")
    assert card.output.operating_threshold == base.card.output.operating_threshold
    assert card.evaluation == {}
    assert card.limitations == base.card.limitations
    again = derive(base, tmp_path, "9.9.9", {"background_mm": 13}, "c")  # a re-run: the card
    assert again == folder and ModelCard.load(folder / "card.json") == card


def test_a_version_holding_other_networks_is_refused(tmp_path: Path) -> None:
    base = _resolve(BASE)
    folder = tmp_path / "lung-nodule" / "9.9.9"
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(b"another network")
    with pytest.raises(DeriveError, match="holds another network"):
        derive(base, tmp_path, "9.9.9", {}, "c")
    assert (folder / "model.onnx").read_bytes() == b"another network"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--set", "background=13"], "KEY one of: background_mm"),
        (["--set", "background_mm"], "expected KEY=VALUE"),
        (["--set", "background_mm=thirteen"], "not a number"),
        (["--set", "background_mm=-1"], "--set background_mm: Input should be greater than 0"),
        (["--set", "max_candidates=0"], "--set max_candidates: Input should be greater"),
    ],
)
def test_bad_settings_name_the_key_and_the_form(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    code = main([BASE, "--version", "9.9.9", "--root", str(tmp_path), *argv])
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "lung-nodule" / "9.9.9" / "card.json").exists()


def test_the_command_line_names_what_it_made(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    evaluation = tmp_path / "froc.json"
    evaluation.write_text(json.dumps(froc(0.8, [0.5, 1.0], [0.9, 0.7])), "utf-8")
    args = [BASE, "--version", "9.9.9", "--root", str(tmp_path), "--set", "background_mm=13"]
    more = ["--description", "Faster.", "--limitation", "One.", "--limitation", "Two."]
    more += ["--network", "two stages"]
    assert main([*args, "--evaluation", str(evaluation), *more]) == 0
    assert "model folder:" in capsys.readouterr().out
    card = ModelCard.load(tmp_path / "lung-nodule" / "9.9.9" / "card.json")
    assert card.evaluation["cpm"] == pytest.approx(0.8)
    assert "--set background_mm=13" in card.training.command
    assert card.description == "Faster. Derived from lung-nodule@0.6.1: background_mm=13."
    assert card.limitations == ["One.", "Two."] and card.network == "two stages"
    assert main([BASE, "--version", "0.6.1", "--root", str(tmp_path)]) == 2
    assert "the base's own version" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main([*args, "--threshold-from", str(evaluation)])
    assert exit_.value.code == 2 and "give both" in capsys.readouterr().err
