"""Model registry: cards that must match their ONNX files, versions, promotion and rollback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import onnx
import pytest
from onnx import TensorProto, helper

from models.registry import ModelCard, ModelError, Registry, sha256_of

CARD: dict[str, Any] = {
    "name": "tiny-nodule",
    "version": "0.0.1",
    "date": "2026-11-28",
    "network": "sigmoid of the input (test model)",
    "description": "A one-operator model for registry tests.",
    "input": {
        "tensor": {"name": "image", "shape": [1, 1, "depth", "height", "width"]},
        "spacing_mm": [2.0, 1.0, 1.0],
        "hu_window": [-1000.0, 400.0],
        "patch_size": [32, 64, 64],
    },
    "output": {
        "tensor": {"name": "probability", "shape": [1, 1, "depth", "height", "width"]},
        "operating_threshold": 0.5,
    },
    "training": {"data": "none", "synthetic": True, "command": "none"},
    "evaluation": {"cpm": 0.0},
    "intended_use": "Tests only.",
    "limitations": ["Not a detector."],
}


def tiny_model(path: Path, input_name: str = "image", scale: float = 1.0) -> Path:
    dims = [1, 1, "depth", "height", "width"]
    x = helper.make_tensor_value_info(input_name, TensorProto.FLOAT, dims)
    y = helper.make_tensor_value_info("probability", TensorProto.FLOAT, dims)
    k = helper.make_tensor("k", TensorProto.FLOAT, [], [scale])
    graph = helper.make_graph(
        [
            helper.make_node("Mul", [input_name, "k"], ["s"]),
            helper.make_node("Sigmoid", ["s"], ["probability"]),
        ],
        "tiny",
        [x],
        [y],
        [k],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def card_for(tmp_path: Path, onnx_path: Path, **changes: Any) -> Path:
    data = json.loads(json.dumps(CARD))
    data["sha256"] = sha256_of(onnx_path)
    data.update(changes)
    path = tmp_path / f"card-{data['version']}.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_register_promote_resolve_and_rollback(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "models")
    v1 = tiny_model(tmp_path / "v1.onnx")
    v2 = tiny_model(tmp_path / "v2.onnx", scale=2.0)
    registry.register(v1, card_for(tmp_path, v1))
    registry.register(v2, card_for(tmp_path, v2, version="0.0.2"))
    assert [e.ref for e in registry.entries()] == ["tiny-nodule@0.0.1", "tiny-nodule@0.0.2"]
    with pytest.raises(ModelError, match="no active version"):
        registry.resolve(None, "tiny-nodule")
    registry.promote("tiny-nodule", "0.0.1")
    registry.promote("tiny-nodule", "0.0.2")
    assert registry.resolve(None, "tiny-nodule").card.version == "0.0.2"
    assert registry.resolve("tiny-nodule@0.0.1", "x").card.version == "0.0.1"
    assert registry.rollback("tiny-nodule").card.version == "0.0.1"
    assert registry.resolve("tiny-nodule", "x").card.version == "0.0.1"
    with pytest.raises(ModelError, match="no earlier promoted version"):
        registry.rollback("tiny-nodule")


def test_a_rollback_after_the_first_promotion_returns_to_the_shipped_default(
    tmp_path: Path,
) -> None:
    shipped = tmp_path / "shipped"
    v1 = tiny_model(tmp_path / "v1.onnx")
    Registry(shipped).register(v1, card_for(tmp_path, v1))
    registry = Registry(tmp_path / "models", (shipped,))
    assert registry.active("tiny-nodule").ref == "tiny-nodule@0.0.1"  # type: ignore[union-attr]
    v2 = tiny_model(tmp_path / "v2.onnx", scale=2.0)
    registry.register(v2, card_for(tmp_path, v2, version="0.0.2"))
    registry.promote("tiny-nodule", "0.0.2")
    assert registry.rollback("tiny-nodule").ref == "tiny-nodule@0.0.1"
    assert registry.active("tiny-nodule").ref == "tiny-nodule@0.0.1"  # type: ignore[union-attr]


def test_registering_the_same_version_twice(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "models")
    v1 = tiny_model(tmp_path / "v1.onnx")
    card = card_for(tmp_path, v1)
    registry.register(v1, card)
    registry.register(v1, card)  # the same file again: nothing changes
    other = tiny_model(tmp_path / "other.onnx", scale=3.0)
    with pytest.raises(ModelError, match="already registered with another file"):
        registry.register(other, card_for(tmp_path, other))


def test_card_must_match_the_file(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "models")
    model = tiny_model(tmp_path / "m.onnx")
    card = card_for(tmp_path, model)
    tiny_model(model, scale=5.0)  # the file changes after the card was written
    with pytest.raises(ModelError, match=r"sha256 .* differs from the card"):
        registry.register(model, card)
    renamed = tiny_model(tmp_path / "renamed.onnx", input_name="ct")
    with pytest.raises(ModelError, match="input does not match the card: name 'ct'"):
        registry.register(renamed, card_for(tmp_path, renamed))
    static = dict(CARD["input"])
    static["tensor"] = {"name": "image", "shape": [1, 1, 32, 64, 64]}
    good = tiny_model(tmp_path / "good.onnx")
    with pytest.raises(ModelError, match="axis 2 is 'depth', card says 32"):
        registry.register(good, card_for(tmp_path, good, input=static))


def test_a_tampered_registered_model_is_refused_at_use(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "models")
    model = tiny_model(tmp_path / "m.onnx")
    entry = registry.register(model, card_for(tmp_path, model))
    registry.promote("tiny-nodule", "0.0.1")
    tiny_model(entry.onnx_path, scale=9.0)
    with pytest.raises(ModelError, match="differs from the card"):
        registry.resolve(None, "tiny-nodule")


def test_invalid_card_names_the_field(tmp_path: Path) -> None:
    model = tiny_model(tmp_path / "m.onnx")
    card = card_for(
        tmp_path, model, output={"tensor": CARD["output"]["tensor"], "operating_threshold": 2}
    )
    with pytest.raises(ModelError, match=r"output\.operating_threshold"):
        ModelCard.load(card)


def test_cli_register_show_list(tmp_path: Path) -> None:
    model = tiny_model(tmp_path / "m.onnx")
    card = card_for(tmp_path, model)
    aidx = [str(Path(sys.executable).parent / "aidx"), "--data-dir", str(tmp_path / "data")]
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIDX_")}
    env["AIDX_MODELS__DEFAULT"] = "tiny-nodule"

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*aidx, *args], capture_output=True, text=True, env=env, check=False)

    empty = run("models", "show")
    assert empty.returncode == 1 and "aidx models register" in empty.stderr
    assert run("models", "register", str(model), "--card", str(card)).returncode == 0
    assert run("models", "promote", "tiny-nodule@0.0.1").returncode == 0
    shown = run("models", "show")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout.split("\n# ")[0])["sha256"] == sha256_of(model)
    listing = run("models", "list")
    assert "* tiny-nodule@0.0.1" in listing.stdout
