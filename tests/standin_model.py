"""A stand-in model with a real ONNX graph (flags soft-tissue density), for pipeline tests that
need inference to run quickly, and a card for it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import onnx
from onnx import TensorProto, helper

from models.registry import sha256_of

DIMS: list[Any] = [1, 1, "depth", "height", "width"]


def soft_tissue_model(path: Path, offset: float = 0.69) -> Path:
    """p = sigmoid(40 (x - offset)); 0.69: above ~ -30 HU in the (-1000, 400) window. Not a
    detector; a stand-in with a real ONNX graph until the trained model ships. Another
    ``offset`` gives a model whose findings differ in a known way (a higher one: denser tissue
    only, so fewer and smaller findings)."""
    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, DIMS)
    y = helper.make_tensor_value_info("probability", TensorProto.FLOAT, DIMS)
    inits = [
        helper.make_tensor("offset", TensorProto.FLOAT, [], [offset]),
        helper.make_tensor("gain", TensorProto.FLOAT, [], [40.0]),
    ]
    nodes = [
        helper.make_node("Sub", ["image", "offset"], ["d"]),
        helper.make_node("Mul", ["d", "gain"], ["s"]),
        helper.make_node("Sigmoid", ["s"], ["probability"]),
    ]
    model = helper.make_model(
        helper.make_graph(nodes, "soft-tissue", [x], [y], inits),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    model.ir_version = 8
    onnx.save(model, path)
    return path


def slow_soft_tissue_model(path: Path, rounds: int) -> Path:
    """The soft-tissue stand-in that also works: each patch first runs ``rounds`` element-wise
    passes over itself (an ONNX Loop) that add nothing to its output. A job then takes seconds,
    long enough to kill its worker in the middle of it."""
    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, DIMS)
    y = helper.make_tensor_value_info("probability", TensorProto.FLOAT, DIMS)
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Sigmoid", ["v_in"], ["v_out"]),
        ],
        "work",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_in", TensorProto.FLOAT, DIMS),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_out", TensorProto.FLOAT, DIMS),
        ],
    )
    inits = [
        helper.make_tensor("offset", TensorProto.FLOAT, [], [0.69]),
        helper.make_tensor("gain", TensorProto.FLOAT, [], [40.0]),
        helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
        helper.make_tensor("rounds", TensorProto.INT64, [], [rounds]),
        helper.make_tensor("yes", TensorProto.BOOL, [], [True]),
    ]
    nodes = [
        helper.make_node("Loop", ["rounds", "yes", "image"], ["worked"], body=body),
        helper.make_node("ReduceMean", ["worked"], ["mean"], keepdims=0),
        helper.make_node("Mul", ["mean", "zero"], ["nothing"]),
        helper.make_node("Sub", ["image", "offset"], ["d"]),
        helper.make_node("Mul", ["d", "gain"], ["s"]),
        helper.make_node("Sigmoid", ["s"], ["p"]),
        helper.make_node("Add", ["p", "nothing"], ["probability"]),
    ]
    model = helper.make_model(
        helper.make_graph(nodes, "slow-soft-tissue", [x], [y], inits),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    model.ir_version = 8
    onnx.save(model, path)
    return path


def card(onnx_path: Path) -> dict[str, Any]:
    return {
        "name": "soft-tissue",
        "version": "0.0.1",
        "date": "2026-11-28",
        "network": "threshold of the input (test stand-in)",
        "description": "Flags soft-tissue density; used to test the pipeline.",
        "input": {
            "tensor": {"name": "image", "shape": DIMS},
            "spacing_mm": [2.5, 1.5, 1.5],
            "hu_window": [-1000.0, 400.0],
            "patch_size": [16, 64, 64],
        },
        "output": {"tensor": {"name": "probability", "shape": DIMS}, "operating_threshold": 0.5},
        "training": {"data": "none", "synthetic": True, "command": "none"},
        "intended_use": "Tests only.",
        "limitations": ["Not a detector."],
        "sha256": sha256_of(onnx_path),
    }


def install(models_dir: Path, root: Path, slow_rounds: int = 0) -> str:
    """Register the stand-in in a registry folder and make it active; returns its name.
    ``slow_rounds``: the slow variant (:func:`slow_soft_tissue_model`)."""
    from models.registry import Registry

    if slow_rounds:
        model = slow_soft_tissue_model(root / "soft-tissue.onnx", slow_rounds)
    else:
        model = soft_tissue_model(root / "soft-tissue.onnx")
    card_path = root / "soft-tissue.card.json"
    card_path.write_text(json.dumps(card(model)), encoding="utf-8")
    registry = Registry(models_dir)
    entry = registry.register(model, card_path)
    registry.promote(entry.card.name, entry.card.version)
    return entry.card.name
