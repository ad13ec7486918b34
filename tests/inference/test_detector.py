"""The two-stage detector's serving side: crops, detections and their regions, its card."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from inference.detector import (
    Detector,
    DetectorError,
    candidate_region,
    crops,
    detector_input,
    fine_index,
    network_cut,
    suppress,
)
from inference.preprocess import Preprocessed
from inference.runner import RunnerOptions
from inference.volume import Volume
from models.registry import DetectorSpec, ModelCard, ModelError, Registry, sha256_of
from tests.models.test_registry import CARD, tiny_model

WINDOW = (-1000.0, 400.0)


def windowed(hu: float) -> float:
    return (hu - WINDOW[0]) / (WINDOW[1] - WINDOW[0])


def test_crops_are_the_neighbourhood_and_its_wider_context() -> None:
    array = np.arange(40 * 40 * 40, dtype=np.float32).reshape(40, 40, 40)
    out = crops(array, np.array([[20.0, 20.0, 20.0], [0.4, 1.0, 39.0]]), 8)
    assert out.shape == (2, 2, 8, 8, 8)
    assert np.array_equal(out[0, 0], array[16:24, 16:24, 16:24])
    assert out[0, 1, 0, 0, 0] == pytest.approx(array[12:14, 12:14, 12:14].mean())
    # beyond the grid is air (0), not a copy of the edge
    assert out[1, 0, 0, 0, 0] == 0.0 and out[1, 0, 4, 4, 4] == array[0, 1, 39]


def test_the_wide_crop_is_the_block_mean_of_twice_the_field() -> None:
    """The wide channel, made from the grid's block means once for all centres, is the 2x2x2
    mean of the (2 size)³ neighbourhood, at any parity of the centre and beyond the edges."""
    rng = np.random.default_rng(3)
    array = rng.random((23, 30, 27), dtype=np.float32)
    centres = np.array([[11.0, 15.0, 13.0], [0.0, 29.0, 1.0], [12.6, 4.4, 25.0]])
    out = crops(array, centres, 8)
    padded = np.pad(array, 8)
    for i, (z, y, x) in enumerate(np.rint(centres).astype(int) + 8):
        big = padded[z - 8 : z + 8, y - 8 : y + 8, x - 8 : x + 8]
        expected = big.reshape(8, 2, 8, 2, 8, 2).mean(axis=(1, 3, 5))
        assert np.allclose(out[i, 1], expected, atol=1e-6)
        assert np.array_equal(out[i, 0], padded[z - 4 : z + 4, y - 4 : y + 4, x - 4 : x + 4])


def sphere_volume() -> Preprocessed:
    z, y, x = np.mgrid[:48, :48, :48].astype(np.float32)
    array = np.full((48, 48, 48), windowed(-850), dtype=np.float32)
    array[(z - 24) ** 2 + (y - 24) ** 2 + (x - 24) ** 2 <= 16] = windowed(30)  # 8 mm nodule
    array[(z - 24) ** 2 + (y - 24) ** 2 <= 2] = windowed(30)  # a vessel through it, along x
    affine = np.diag([0.8, 0.8, 0.8, 1.0])
    return Preprocessed(array=array, affine=affine)


def test_a_detection_is_the_nodule_not_the_vessel_through_it() -> None:
    pre = sphere_volume()
    voxels = candidate_region(pre, np.array([24.0, 24.0, 24.0]), 6.4, WINDOW)
    region = np.zeros(pre.array.shape, dtype=bool)
    region[tuple(voxels.T)] = True
    assert region[24, 24, 24] and region[24, 27, 24]
    nodule_voxels = 4.0**3 * np.pi * 4 / 3  # radius 4 voxels
    assert 0.7 * nodule_voxels <= region.sum() <= 1.6 * nodule_voxels
    assert not region[24, 24, 5] and not region[24, 24, 43]  # the vessel further along


def test_a_detection_in_plain_lung_is_a_ball_of_its_predicted_size() -> None:
    pre = sphere_volume()
    voxels = candidate_region(pre, np.array([8.0, 8.0, 8.0]), 4.0, WINDOW)
    distance = np.linalg.norm((voxels - 8) * 0.8, axis=1)
    assert len(voxels) > 0 and distance.max() <= 2.5 * 1.25 + 0.8


def test_one_nodule_seen_twice_is_one_detection_and_its_neighbour_keeps_its_own() -> None:
    index = np.array([[20.0, 20, 20], [21, 20, 20], [20, 20, 29], [40, 40, 40]])
    probability = np.array([0.6, 0.9, 0.8, 0.1])
    diameter = np.array([10.0, 10.0, 4.0, 4.0])
    kept = suppress(index, probability, diameter, 1.0, 3.0)
    # the stronger of the two views of the 10 mm nodule, the 4 mm one 9 mm away, the far one
    assert kept.tolist() == [1, 2, 3]
    # a larger predicted nodule takes in its neighbour
    assert suppress(index, probability, np.array([10.0, 20.0, 4.0, 4.0]), 1.0, 3.0).tolist() == [
        1,
        3,
    ]


def test_fine_index_inverts_the_affine() -> None:
    pre = Preprocessed(
        array=np.zeros((4, 4, 4), np.float32),
        affine=np.array([[0, 0, 2, 10], [0, 2, 0, 20], [2, 0, 0, 30], [0, 0, 0, 1]], float),
    )
    points = pre.to_patient(np.array([[1.0, 2.0, 3.0]]))
    assert fine_index(pre, points) == pytest.approx(np.array([[1.0, 2.0, 3.0]]))


DETECTOR: dict[str, Any] = {
    "spacing_mm": 1.0,
    "candidates": {
        "sigmas_mm": [0.9, 1.8],
        "min_response": 0.02,
        "max_candidates": 10,
        "shape_power": 1.0,
        "lung_closing_mm": 12.0,
        "lung_margin_mm": 4.0,
    },
    "classifier": {
        "file": "classifier.onnx",
        "sha256": "0" * 64,
        "input": {"name": "crops", "shape": ["batch", 2, 8, 8, 8]},
        "output": {"name": "scores", "shape": ["batch", 2]},
        "crop_size": 8,
    },
}


def two_stage_folder(tmp_path: Path) -> tuple[Path, Path]:
    """A model folder: a tiny first stage and a tiny classifier (ONNX), and its card."""
    from onnx import TensorProto, helper, save

    folder = tmp_path / "upload"
    folder.mkdir()
    first = tiny_model(folder / "model.onnx")
    x = helper.make_tensor_value_info("crops", TensorProto.FLOAT, ["batch", 2, 8, 8, 8])
    y = helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", 2])
    axes = helper.make_tensor("axes", TensorProto.INT64, [3], [2, 3, 4])
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["crops", "axes"], ["m"], keepdims=0),
            helper.make_node("Sigmoid", ["m"], ["scores"]),
        ],
        "classifier",
        [x],
        [y],
        [axes],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    save(model, folder / "classifier.onnx")
    data = json.loads(json.dumps(CARD)) | {"sha256": sha256_of(first)}
    data["detector"] = json.loads(json.dumps(DETECTOR))
    data["detector"]["classifier"]["sha256"] = sha256_of(folder / "classifier.onnx")
    card = folder / "card.json"
    card.write_text(json.dumps(data), encoding="utf-8")
    return first, card


def test_a_two_stage_model_registers_with_both_graphs(tmp_path: Path) -> None:
    first, card = two_stage_folder(tmp_path)
    entry = Registry(tmp_path / "models").register(first, card)
    assert entry.card.detector is not None
    assert (entry.folder / "classifier.onnx").is_file()
    assert ModelCard.load(entry.folder / "card.json").detector == entry.card.detector


def test_a_changed_or_missing_classifier_is_refused(tmp_path: Path) -> None:
    first, card = two_stage_folder(tmp_path)
    classifier = first.parent / "classifier.onnx"
    saved = tmp_path / "saved.onnx"
    shutil.copyfile(classifier, saved)
    classifier.write_bytes(classifier.read_bytes() + b"\0")
    with pytest.raises(ModelError, match=r"differs from the card's detector\.classifier\.sha256"):
        Registry(tmp_path / "models").register(first, card)
    classifier.unlink()
    with pytest.raises(ModelError, match="the classifier the card names is missing"):
        Registry(tmp_path / "models").register(first, card)
    shutil.copyfile(saved, classifier)
    data = json.loads(card.read_text(encoding="utf-8"))
    data["detector"]["classifier"]["output"]["name"] = "probability"
    card.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(ModelError, match="classifier output does not match the card: name"):
        Registry(tmp_path / "models").register(first, card)


def test_a_bad_detector_section_names_the_field(tmp_path: Path) -> None:
    data = json.loads(json.dumps(CARD)) | {"sha256": "0" * 64}
    data["detector"] = json.loads(json.dumps(DETECTOR))
    data["detector"]["candidates"]["max_candidates"] = 0
    path = tmp_path / "card.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(ModelError, match=r"detector\.candidates\.max_candidates"):
        ModelCard.load(path)


def chest_volume() -> tuple[Volume, np.ndarray]:
    """A 1 mm chest: body, two lungs, a 6 mm solid nodule in the right lung (patient mm)."""
    z, y, x = np.mgrid[:48, :96, :96].astype(np.float32)
    hu = np.full((48, 96, 96), -1000.0, dtype=np.float32)
    hu[(y - 48) ** 2 / 44**2 + (x - 48) ** 2 / 44**2 <= 1] = 40.0
    for cx in (22, 74):
        hu[(y - 48) ** 2 / 30**2 + (x - cx) ** 2 / 12**2 <= 1] = -850.0
    nodule = np.array([24.0, 40.0, 22.0])  # (k, row, column)
    hu[(z - nodule[0]) ** 2 + (y - nodule[1]) ** 2 + (x - nodule[2]) ** 2 <= 9] = 30.0
    volume = Volume(
        hu=hu,
        origin=np.zeros(3),
        row_dir=np.array([1.0, 0.0, 0.0]),
        col_dir=np.array([0.0, 1.0, 0.0]),
        normal=np.array([0.0, 0.0, 1.0]),
        spacing=(1.0, 1.0, 1.0),
        sop_uids=tuple(f"1.2.3.{k}" for k in range(48)),
        study_uid="1.2.3",
        series_uid="1.2.3.4",
        frame_of_reference_uid="1.2.3.5",
    )
    return volume, volume.to_patient(nodule)


def test_the_detector_finds_the_nodule_with_its_mask_on_the_series_grid(tmp_path: Path) -> None:
    first, card = two_stage_folder(tmp_path)
    entry = Registry(tmp_path / "models").register(first, card)
    volume, centre = chest_volume()
    detector = Detector(entry, RunnerOptions(providers=("CPUExecutionProvider",)))
    findings, timings = detector.detect(volume, 0.01, 5.0)
    assert {"lungs_s", "fine_preprocess_s", "candidates_s", "classifier_s", "findings_s"} <= set(
        timings
    )
    near = [f for f in findings if np.linalg.norm(np.asarray(f.center_mm) - centre) <= 3.0]
    assert len(near) == 1, [f.center_mm for f in findings]
    mask = near[0].mask
    assert mask is not None and mask.shape == volume.hu.shape
    assert 80 <= int(mask.sum()) <= 200  # the 6 mm sphere: 123 voxels of 1 mm³
    assert 5.0 <= near[0].diameter_mm <= 7.5
    assert near[0].key_sop_instance_uid == "1.2.3.24"


@pytest.mark.parametrize(("network_overlap", "expected"), [(None, 0.25), (0.0, 0.0)])
def test_the_first_stage_runs_at_the_cards_overlap_or_the_configurations(
    tmp_path: Path, network_overlap: float | None, expected: float
) -> None:
    first, card = two_stage_folder(tmp_path)
    data = json.loads(card.read_text(encoding="utf-8"))
    data["detector"]["candidates"] |= {"network": True, "network_overlap": network_overlap}
    card.write_text(json.dumps(data), encoding="utf-8")
    entry = Registry(tmp_path / "models").register(first, card)
    options = RunnerOptions(providers=("CPUExecutionProvider",), overlap=0.25)
    detector = Detector(entry, options)
    assert detector.network is not None
    assert detector.network.options.overlap == expected
    assert detector.options.overlap == 0.25  # the rest of the detector keeps the configuration's


def test_a_model_without_a_detector_section_is_not_a_detector(tmp_path: Path) -> None:
    first = tiny_model(tmp_path / "model.onnx")
    data = json.loads(json.dumps(CARD)) | {"sha256": sha256_of(first)}
    (tmp_path / "card.json").write_text(json.dumps(data), encoding="utf-8")
    entry = Registry(tmp_path / "models").register(first, tmp_path / "card.json")
    with pytest.raises(DetectorError, match="is not a two-stage detector"):
        Detector(entry)


class CornerClassifier:
    """Scores a crop by its first voxel: flips move other voxels there."""

    def score(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        value = batch[:, 0, 0, 0, 0].astype(np.float64)
        return value, 10.0 * value


def test_the_most_probable_candidates_are_scored_in_all_flips(tmp_path: Path) -> None:
    first, card = two_stage_folder(tmp_path)
    entry = Registry(tmp_path / "models").register(first, card)
    detector = Detector(entry, RunnerOptions(providers=("CPUExecutionProvider",)))
    detector.classifier = CornerClassifier()  # type: ignore[assignment]
    batch = np.zeros((3, 2, 2, 2, 2), dtype=np.float32)
    batch[:, 0, 0, 0, 0] = [0.9, 0.1, 0.5]  # each crop's corner: its single-view score
    batch[0, 0, 1, 1, 1] = 0.8  # the opposite corner, which one of the 8 flips brings there
    p, d = detector.classifier.score(batch)
    p2, d2 = detector._augmented(batch, p, d, top=2)
    assert p2[0] == pytest.approx((0.9 + 0.8) / 8)  # the mean of the 8 views
    assert p2[2] == pytest.approx(0.5 / 8)
    assert p2[1] == pytest.approx(0.1)  # not among the top 2: its single score stays
    assert d2[0] == pytest.approx(10 * (0.9 + 0.8) / 8)


def test_a_detection_inside_a_stronger_ones_region_is_the_same_nodule() -> None:
    from inference.detector import distinct
    from inference.postprocess import Region

    big = np.argwhere(np.ones((12, 12, 12), dtype=bool))  # a large nodule's region, 0..11
    beside = np.argwhere(np.ones((3, 3, 3), dtype=bool)) + 20  # a small one outside it
    regions = [
        Region(0.7, big[:10], np.array([10.0, 10.0, 10.0])),  # off-centre, inside the big one
        Region(0.99, big, np.array([5.0, 5.0, 5.0])),
        Region(0.6, beside, np.array([21.0, 21.0, 21.0])),
    ]
    kept = distinct(regions, (32, 32, 32))
    assert [r.probability for r in kept] == [0.99, 0.6]


@pytest.mark.parametrize("margin_mm", [0.0, 7.5, 20.0])
def test_the_first_stage_sees_the_lungs_box_with_the_cards_margin(
    monkeypatch: pytest.MonkeyPatch, margin_mm: float
) -> None:
    """Cut from the fine grid's cut, the first stage's input is exactly the series cut to the
    lungs' box with that margin (the region and the voxels); without a margin it is the cut."""
    from inference import detector

    volume, _ = chest_volume()
    spec = DetectorSpec.model_validate(DETECTOR)
    data = detector_input(volume, spec, WINDOW)
    assert network_cut(data, None) is data.cut
    ours = network_cut(data, margin_mm)
    monkeypatch.setattr(detector, "BOX_MARGIN_MM", margin_mm)
    direct = detector_input(volume, spec, WINDOW).cut
    assert np.array_equal(ours.hu, direct.hu) and ours.sop_uids == direct.sop_uids
    assert np.allclose(ours.origin, direct.origin)
    assert ours.hu.size < volume.hu.size
    if margin_mm < 20.0:
        assert ours.hu.size < data.cut.hu.size
