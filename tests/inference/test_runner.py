"""The ONNX Runtime runner: same numbers as MONAI's sliding window, provider fallback, torch-free.

A tiny 3D convolutional network is built in torch, exported to ONNX and run both ways: through
``OnnxRunner`` (numpy Gaussian blending) and through MONAI's ``sliding_window_inference`` with
the torch network. The two maps must agree to 1e-4.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from monai.inferers import sliding_window_inference
from onnx import TensorProto, helper

from inference.preprocess import PreprocessSpec, preprocess
from inference.runner import (
    CPU_ONLY_PROVIDERS,
    OnnxRunner,
    RunnerError,
    RunnerOptions,
    importance_map,
)
from inference.volume import load_series
from models.registry import ModelCard, sha256_of, verify
from tests.conftest import REPO
from training.phantom import NoduleRequest, PhantomOptions, generate

PATCH = (16, 48, 48)
SPEC = PreprocessSpec(spacing_mm=(2.5, 3.0, 3.0), hu_window=(-1000.0, 400.0))
DYNAMIC = ["batch", 1, "depth", "height", "width"]


class TinyNet(torch.nn.Module):
    """Two 3D convolutions and a sigmoid: enough receptive field for window borders to matter."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(7)
        self.body = torch.nn.Sequential(
            torch.nn.Conv3d(1, 4, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.Conv3d(4, 4, 3, padding=2, dilation=2),
            torch.nn.ReLU(),
            torch.nn.Conv3d(4, 1, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(4.0 * (self.body(x) - 0.1))


def card_dict(
    onnx_path: Path, *, input_dtype: str = "float32", input_shape: list[Any] | None = None
) -> dict[str, Any]:
    shape = input_shape or DYNAMIC
    return {
        "name": "tiny-conv",
        "version": "0.0.1",
        "date": "2026-11-28",
        "network": "three 3D convolutions and a sigmoid (test model)",
        "description": "A tiny untrained network for runner tests.",
        "input": {
            "tensor": {"name": "image", "shape": shape, "dtype": input_dtype},
            "spacing_mm": list(SPEC.spacing_mm),
            "hu_window": list(SPEC.hu_window),
            "patch_size": list(PATCH),
        },
        "output": {
            "tensor": {"name": "probability", "shape": shape, "dtype": input_dtype},
            "operating_threshold": 0.5,
        },
        "training": {"data": "none", "synthetic": True, "command": "none"},
        "evaluation": {},
        "sha256": sha256_of(onnx_path),
        "intended_use": "Tests only.",
        "limitations": ["Untrained."],
    }


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[TinyNet, Path, ModelCard]:
    folder = tmp_path_factory.mktemp("model")
    net = TinyNet().eval()
    path = folder / "model.onnx"
    axes = {0: "batch", 2: "depth", 3: "height", 4: "width"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter's notice
        torch.onnx.export(
            net,
            (torch.zeros(1, 1, *PATCH),),
            str(path),
            input_names=["image"],
            output_names=["probability"],
            dynamic_axes={"image": axes, "probability": axes},
            opset_version=17,
            dynamo=False,  # the dynamo exporter needs onnxscript, which training does not install
        )
    card = ModelCard.model_validate(card_dict(path))
    verify(card, path)  # the registry accepts this pair
    return net, path, card


@pytest.fixture(scope="module")
def volume_array(tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    out = tmp_path_factory.mktemp("phantom")
    generate(
        out,
        PhantomOptions(
            seed=21,
            slices=40,
            matrix=128,
            slice_thickness=2.5,
            nodule_requests=(NoduleRequest(14.0, "solid", "isolated", "smooth"),),
            workers=1,
        ),
    )
    volume = load_series(sorted((out / "dicom").glob("*.dcm")))
    return preprocess(volume, SPEC).array


def monai_map(net: TinyNet, array: np.ndarray, roi: tuple[int, ...], overlap: float) -> np.ndarray:
    with torch.no_grad():
        out = sliding_window_inference(
            torch.from_numpy(array)[None, None],
            roi_size=roi,
            sw_batch_size=1,
            predictor=net,
            overlap=overlap,
            mode="gaussian",
            sigma_scale=0.125,
            padding_mode="constant",
            cval=0.0,
        )
    assert isinstance(out, torch.Tensor)
    return out[0, 0].numpy()


@pytest.mark.parametrize(
    ("crop", "overlap", "batch"),
    [
        ((slice(None), slice(None), slice(None)), 0.25, 1),  # the whole preprocessed phantom
        ((slice(5, 15), slice(None), slice(20, 120)), 0.25, 3),  # 10 slices: padded in z
        ((slice(0, 30), slice(10, 50), slice(0, 47)), 0.5, 2),  # smaller than the patch in y, x
    ],
)
def test_sliding_window_matches_monai(
    model: tuple[TinyNet, Path, ModelCard],
    volume_array: np.ndarray,
    crop: tuple[slice, slice, slice],
    overlap: float,
    batch: int,
) -> None:
    net, path, card = model
    array = np.ascontiguousarray(volume_array[crop])
    runner = OnnxRunner(path, card, RunnerOptions(overlap=overlap, batch_size=batch))
    ours = runner.predict(array)
    theirs = monai_map(net, array, PATCH, overlap)
    assert ours.shape == array.shape and ours.dtype == np.float32
    assert float(np.abs(ours - theirs).max()) < 1e-4
    # The blend is not trivial: windows disagree near their borders.
    assert float(ours.std()) > 0.01


def test_whole_mode_is_one_padded_window(
    model: tuple[TinyNet, Path, ModelCard], volume_array: np.ndarray
) -> None:
    net, path, card = model
    array = np.ascontiguousarray(volume_array[:37, :90, 5:100])
    runner = OnnxRunner(path, card, RunnerOptions(mode="whole"))
    # Padded (centred, zeros) to a multiple of 16, the patch's common power of two.
    theirs = monai_map(net, array, (48, 96, 96), 0.0)
    assert float(np.abs(runner.predict(array) - theirs).max()) < 1e-4


def test_fixed_batch_model_runs_one_window_at_a_time(
    model: tuple[TinyNet, Path, ModelCard],
    volume_array: np.ndarray,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    net, _, _ = model
    path = tmp_path / "batch1.onnx"
    axes = {2: "depth", 3: "height", 4: "width"}  # batch fixed at 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            net,
            (torch.zeros(1, 1, *PATCH),),
            str(path),
            input_names=["image"],
            output_names=["probability"],
            dynamic_axes={"image": axes, "probability": axes},
            opset_version=17,
            dynamo=False,
        )
    shape: list[Any] = [1, 1, "depth", "height", "width"]
    card = ModelCard.model_validate(card_dict(path, input_shape=shape))
    verify(card, path)
    with caplog.at_level(logging.INFO, logger="aidx.inference.runner"):
        runner = OnnxRunner(path, card, RunnerOptions(batch_size=4))
    assert runner.batch_size == 1
    assert any("fixed batch of 1; batch_size 4 ignored" in r.getMessage() for r in caplog.records)
    array = np.ascontiguousarray(volume_array[:24, :70, :70])
    theirs = monai_map(net, array, PATCH, 0.25)
    assert float(np.abs(runner.predict(array) - theirs).max()) < 1e-4


def test_importance_map_is_monais() -> None:
    from monai.data.utils import compute_importance_map

    for size in [(16, 48, 48), (7, 5, 96)]:
        theirs = compute_importance_map(size, mode="gaussian", sigma_scale=0.125).numpy()
        assert np.allclose(importance_map(size), theirs, rtol=1e-6, atol=1e-7)


def test_unavailable_provider_falls_back_with_a_log_line(
    model: tuple[TinyNet, Path, ModelCard],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, path, card = model
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" in available:  # a GPU build: hide CUDA to test the fallback
        hidden = [p for p in available if p != "CUDAExecutionProvider"]
        monkeypatch.setattr(ort, "get_available_providers", lambda: hidden)
    options = RunnerOptions(providers=("CUDAExecutionProvider", "CPUExecutionProvider"))
    with caplog.at_level(logging.DEBUG, logger="aidx.inference.runner"):
        runner = OnnxRunner(path, card, options)
    assert runner.provider == "CPUExecutionProvider"
    assert runner.session.get_providers()[0] == "CPUExecutionProvider"
    records = [r for r in caplog.records if "falling back" in r.getMessage()]
    assert [r.getMessage() for r in records] == [
        "execution provider CUDAExecutionProvider is not available in this ONNX Runtime; "
        "falling back to CPUExecutionProvider"
    ]
    if set(ort.get_available_providers()) <= CPU_ONLY_PROVIDERS:
        # a CPU-only install is expected to lack CUDA: nothing to warn about on every start
        assert records[0].levelno == logging.DEBUG
    else:
        assert records[0].levelno in (logging.WARNING, logging.INFO)


def test_no_usable_provider_says_what_to_do(model: tuple[TinyNet, Path, ModelCard]) -> None:
    _, path, card = model
    with pytest.raises(RunnerError, match=r"add CPUExecutionProvider to inference\.providers"):
        OnnxRunner(path, card, RunnerOptions(providers=("NoSuchExecutionProvider",)))


def test_io_binding_path_gives_the_same_map(
    model: tuple[TinyNet, Path, ModelCard], volume_array: np.ndarray
) -> None:
    _, path, card = model
    array = np.ascontiguousarray(volume_array[:20, :60, :60])
    plain = OnnxRunner(path, card).predict(array)
    bound = OnnxRunner(path, card, RunnerOptions(io_binding=True))
    assert bound._binding_device is None  # ignored on CPU ...
    bound._binding_device = "cpu"  # ... so force the binding code path onto CPU memory
    assert np.array_equal(bound.predict(array), plain)


def half_precision_model(path: Path) -> Path:
    """float16 in and out: sigmoid((x - 0.5) × 8) computed in float32 between two casts."""
    dims: list[Any] = list(DYNAMIC)
    x = helper.make_tensor_value_info("image", TensorProto.FLOAT16, dims)
    y = helper.make_tensor_value_info("probability", TensorProto.FLOAT16, dims)
    nodes = [
        helper.make_node("Cast", ["image"], ["x32"], to=TensorProto.FLOAT),
        helper.make_node("Sub", ["x32", "half"], ["centred"]),
        helper.make_node("Mul", ["centred", "gain"], ["scaled"]),
        helper.make_node("Sigmoid", ["scaled"], ["p32"]),
        helper.make_node("Cast", ["p32"], ["probability"], to=TensorProto.FLOAT16),
    ]
    constants = [
        helper.make_tensor("half", TensorProto.FLOAT, [], [0.5]),
        helper.make_tensor("gain", TensorProto.FLOAT, [], [8.0]),
    ]
    graph = helper.make_graph(nodes, "half", [x], [y], constants)
    onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx_model.ir_version = 8
    onnx.save(onnx_model, path)
    return path


def test_float16_model_needs_fp16(tmp_path: Path, volume_array: np.ndarray) -> None:
    path = half_precision_model(tmp_path / "half.onnx")
    card = ModelCard.model_validate(card_dict(path, input_dtype="float16"))
    verify(card, path)
    with pytest.raises(RunnerError, match=r"set inference\.fp16 to true"):
        OnnxRunner(path, card)
    array = np.ascontiguousarray(volume_array[:20, :50, :50])
    out = OnnxRunner(path, card, RunnerOptions(fp16=True)).predict(array)
    expected = 1.0 / (1.0 + np.exp(-8.0 * (array - 0.5)))
    assert out.dtype == np.float32
    assert float(np.abs(out - expected).max()) < 5e-3  # float16 rounding


def test_static_spatial_axes_must_be_the_patch(model: tuple[TinyNet, Path, ModelCard]) -> None:
    _, path, _ = model
    card = ModelCard.model_validate(card_dict(path, input_shape=[1, 1, 16, 32, 32]))
    with pytest.raises(RunnerError, match="neither dynamic nor the patch_size"):
        OnnxRunner(path, card)


def test_bad_input_is_refused(model: tuple[TinyNet, Path, ModelCard]) -> None:
    _, path, card = model
    with pytest.raises(RunnerError, match=r"one preprocessed volume \[z, y, x\]"):
        OnnxRunner(path, card).predict(np.zeros((1, 8, 8, 8), dtype=np.float32))
    with pytest.raises(RunnerError, match="overlap must be in"):
        RunnerOptions(overlap=1.0)


def test_runner_and_postprocess_do_not_load_torch() -> None:
    code = (
        "import sys\n"
        "import inference.runner, inference.postprocess\n"
        "loaded = sorted(m for m in ('torch', 'monai') if m in sys.modules)\n"
        "assert not loaded, loaded\n"
        "print('ok')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, cwd=REPO
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_findings_match_the_pytorch_monai_path(
    model: tuple[TinyNet, Path, ModelCard], tmp_path: Path
) -> None:
    """The issue's parity criterion on findings: centres within 1 mm, probabilities 1e-3."""
    from inference.postprocess import findings_from_probability

    net, path, card = model
    generate(
        tmp_path,
        PhantomOptions(
            seed=22,
            slices=32,
            matrix=128,
            slice_thickness=2.5,
            nodule_requests=(NoduleRequest(16.0, "solid", "isolated", "smooth"),),
            workers=1,
        ),
    )
    volume = load_series(sorted((tmp_path / "dicom").glob("*.dcm")))
    pre = preprocess(volume, SPEC)
    ours = OnnxRunner(path, card, RunnerOptions()).predict(pre.array)
    theirs = monai_map(net, pre.array, PATCH, 0.25)
    threshold = float(np.quantile(ours, 0.98))
    a = findings_from_probability(ours, pre, volume, threshold, min_volume_mm3=20.0)
    b = findings_from_probability(theirs, pre, volume, threshold, min_volume_mm3=20.0)
    assert a, "the test map must give findings"
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert np.linalg.norm(np.subtract(x.center_mm, y.center_mm)) < 1.0
        assert abs(x.probability - y.probability) < 1e-3
