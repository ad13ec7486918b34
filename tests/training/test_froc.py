"""LUNA16-style FROC: matching, curve, CPM, size bands, bootstrap, JSON, PNG, loaders."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from inference.findings import Finding, FindingsReport
from tests.conftest import REPO
from training.froc import (
    Detection,
    FrocError,
    FrocReport,
    Nodule,
    Scan,
    compare,
    evaluate,
    plot_froc,
)
from training.froc_io import (
    build_scans,
    load_detections,
    load_ground_truth,
    read_detections_csv,
    write_detections_csv,
)


def nod(x: float, y: float, z: float, d: float) -> Nodule:
    return Nodule((x, y, z), d)


def det(x: float, y: float, z: float, p: float) -> Detection:
    return Detection((x, y, z), p)


def two_scans(a: list[Detection], b: list[Detection]) -> list[Scan]:
    """Scan A: nodules at the origin (10 mm) and (50, 0, 0) (8 mm); scan B: the origin (12 mm)
    and (0, 50, 0) (5 mm)."""
    return [
        Scan("A", (nod(0, 0, 0, 10), nod(50, 0, 0, 8)), tuple(a)),
        Scan("B", (nod(0, 0, 0, 12), nod(0, 50, 0, 5)), tuple(b)),
    ]


def test_a_perfect_detector_has_sensitivity_one_everywhere() -> None:
    scans = two_scans(
        [det(0, 0, 0, 0.9), det(50, 0, 0, 0.8)], [det(0, 0, 0, 0.7), det(0, 50, 0, 0.6)]
    )
    report = evaluate(scans, bootstrap=20)
    assert report.sensitivities == (1.0,) * 7
    assert report.cpm == 1.0
    assert (report.n_nodules, report.n_detected, report.n_false_positives) == (4, 4, 0)
    assert report.cpm_ci == (1.0, 1.0)


def test_one_fp_per_scan_ranked_below_all_hits() -> None:
    # Three of four nodules found above both FPs: the curve rises to 0.75 at 0 FPs, then runs flat.
    scans = two_scans(
        [det(0, 0, 0, 0.9), det(50, 0, 0, 0.8), det(-80, 0, 0, 0.5)],
        [det(0, 0, 0, 0.7), det(80, 80, 80, 0.4)],
    )
    report = evaluate(scans, bootstrap=0)
    assert report.sensitivities == (0.75,) * 7
    assert report.cpm == 0.75
    assert report.n_false_positives == 2
    assert report.curve_fps == (0.0, 0.0, 0.0, 0.5, 1.0)
    assert report.curve_sensitivity == (0.25, 0.5, 0.75, 0.75, 0.75)
    assert report.curve_thresholds == (0.9, 0.8, 0.7, 0.5, 0.4)


def test_interleaved_fps_give_the_luna16_interpolated_sensitivities() -> None:
    # Ranking: hit .9, FP .8, hit .7, FP .6, FP .5, hit .4, FPs .35 .3 .25 .2; one nodule missed.
    scans = two_scans(
        [
            *(det(1, 0, 0, 0.9), det(-90, 0, 0, 0.8), det(-90, 9, 0, 0.5)),
            *(det(50, 0, 2, 0.4), det(-90, 0, 9, 0.3), det(-90, 0, -9, 0.2)),
        ],
        [det(0, 3, 0, 0.7), det(90, 0, 0, 0.6), det(90, 9, 0, 0.35), det(90, 0, 9, 0.25)],
    )
    report = evaluate(scans, bootstrap=0)
    # Points (FPs/scan, sens): (0,.25) (.5,.25) (.5,.5) (1,.5) (1.5,.5) (1.5,.75) ... (3.5,.75).
    # At 1/2 FP the curve rises vertically: np.interp takes the upper value, as in LUNA16.
    assert report.sensitivities == (0.25, 0.25, 0.5, 0.5, 0.75, 0.75, 0.75)
    assert report.cpm == pytest.approx(3.75 / 7)
    assert report.curve_fps[-1] == 3.5
    assert report.sensitivity_at(8.0) == 0.75  # beyond the curve's end: its last sensitivity


def test_tied_scores_are_interpolated_linearly_from_the_origin() -> None:
    # One scan: a hit and an FP both at 0.5 make one point (1 FP, sens 1) after (0, 0).
    scans = [Scan("A", (nod(0, 0, 0, 10),), (det(0, 0, 0, 0.5), det(40, 0, 0, 0.5)))]
    report = evaluate(scans, bootstrap=0)
    assert report.sensitivities == (0.125, 0.25, 0.5, 1.0, 1.0, 1.0, 1.0)
    assert report.cpm == pytest.approx(4.875 / 7)


def test_several_hits_on_one_nodule_count_once_and_are_not_fps() -> None:
    scans = [
        Scan(
            "A",
            (nod(0, 0, 0, 10), nod(30, 0, 0, 6)),
            (det(0, 0, 0, 0.3), det(1, 1, 1, 0.9), det(-2, 0, 0, 0.6), det(60, 0, 0, 0.5)),
        )
    ]
    report = evaluate(scans, bootstrap=0)
    assert (report.n_detected, report.n_false_positives) == (1, 1)
    # The nodule scores 0.9 (its best hit); 0.6 and 0.3 are neither thresholds nor FPs.
    assert report.curve_thresholds == (0.9, 0.5)
    assert report.sensitivities == (0.5,) * 7


def test_a_detection_exactly_on_the_radius_counts_as_a_hit() -> None:
    scans = [
        Scan(
            "A",
            (nod(1, 2, 3, 10), nod(100, 0, 0, 10)),
            (det(4, 6, 3, 0.8), det(103, 4, 0.01, 0.7)),  # distance 5.0 and just over 5.0
        )
    ]
    report = evaluate(scans, bootstrap=0)
    assert (report.n_detected, report.n_false_positives) == (1, 1)
    assert report.curve_thresholds == (0.8, 0.7)


def test_hits_on_excluded_nodules_are_neither_tp_nor_fp() -> None:
    scans = [
        Scan(
            "A",
            (nod(0, 0, 0, 10),),
            # 0.95 hits only the excluded nodule; 0.9 hits both (a TP); 0.2 hits nothing (FP).
            (det(40, 0, 0, 0.95), det(3, 0, 0, 0.9), det(-50, 0, 0, 0.2)),
            exclude=(nod(40, 0, 0, 4), nod(6, 0, 0, 6)),
        )
    ]
    report = evaluate(scans, bootstrap=0)
    assert (report.n_nodules, report.n_detected) == (1, 1)
    assert (report.n_false_positives, report.n_ignored) == (1, 1)
    assert report.curve_thresholds == (0.9, 0.2)
    assert report.cpm == 1.0


def test_empty_detections_score_zero_and_no_nodules_is_an_error() -> None:
    report = evaluate(two_scans([], []), bootstrap=10)
    assert report.sensitivities == (0.0,) * 7
    assert report.cpm == 0.0
    assert report.curve_fps == ()
    assert report.cpm_ci == (0.0, 0.0)
    assert all(b.sensitivity in (0.0, None) for b in report.size_bands)
    with pytest.raises(FrocError, match="no \\(non-excluded\\) nodules"):
        evaluate([Scan("A", (), (det(0, 0, 0, 0.5),))])
    with pytest.raises(FrocError, match="repeat"):
        evaluate([Scan("A", (nod(0, 0, 0, 5),), ()), Scan("A", (), ())])


def size_band_scans() -> list[Scan]:
    nodules = (
        nod(0, 0, 0, 4),  # 3-6, hit 0.9
        nod(0, 100, 0, 5),  # 3-6, missed
        nod(0, 200, 0, 8),  # 6-10, hit 0.3
        nod(0, 300, 0, 15),  # 10-20, hit 0.8
        nod(0, 400, 0, 25),  # 20-30, missed
        nod(0, 500, 0, 22),  # 20-30, hit 0.1
        nod(0, 600, 0, 35),  # outside every band, hit 0.95
    )
    detections = (
        det(0, 0, 0, 0.9),
        det(0, 200, 0, 0.3),
        det(0, 300, 0, 0.8),
        det(0, 500, 0, 0.1),
        det(0, 600, 0, 0.95),
        det(-200, 0, 0, 0.5),  # FP: 1 FP/scan from 0.5 down
        det(-300, 0, 0, 0.2),  # FP: 2 FP/scan from 0.2 down
    )
    return [Scan("A", nodules, detections)]


def test_size_bands_at_one_fp_per_scan_and_at_the_curve_end() -> None:
    at_one = evaluate(size_band_scans(), bootstrap=0)
    assert at_one.band_fp_rate == 1.0
    bands = [(b.low_mm, b.high_mm, b.n_nodules, b.sensitivity) for b in at_one.size_bands]
    # 1 FP/scan keeps detections down to 0.3 (still 1 FP); 0.1 needs 2 FPs.
    assert bands == [(3, 6, 2, 0.5), (6, 10, 1, 1.0), (10, 20, 1, 1.0), (20, 30, 2, 0.0)]
    at_end = evaluate(size_band_scans(), band_fp_rate=None, bootstrap=0)
    assert [b.sensitivity for b in at_end.size_bands] == [0.5, 1.0, 1.0, 0.5]
    custom = evaluate(size_band_scans(), size_bands=[(30, 40), (40, 50)], bootstrap=0)
    assert [(b.n_nodules, b.sensitivity) for b in custom.size_bands] == [(1, 1.0), (0, None)]


def test_bootstrap_is_seeded_and_can_be_turned_off() -> None:
    scans = [
        Scan(f"S{i}", (nod(0, 0, 0, 10),), (det(0, 0, 0, 0.1 * i), det(50, 0, 0, 0.5)))
        for i in range(1, 9)
    ]
    first = evaluate(scans, seed=3)
    assert first.cpm_ci is not None
    lo, hi = first.cpm_ci
    assert 0.0 <= lo <= hi <= 1.0
    assert lo < hi
    assert evaluate(scans, seed=3).cpm_ci == first.cpm_ci
    assert evaluate(scans, bootstrap=0).cpm_ci is None


def test_json_round_trips(tmp_path: Path) -> None:
    report = evaluate(size_band_scans(), bootstrap=25, seed=7)
    assert FrocReport.from_json(json.loads(json.dumps(report.to_json()))) == report
    path = tmp_path / "froc.json"
    report.write(path)
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["format"] == "aidx-froc/1"
    assert data["cpm"] == report.cpm
    assert FrocReport.from_json(data) == report
    with pytest.raises(FrocError, match="format"):
        FrocReport.from_json({**data, "format": "other"})


def test_plot_writes_a_png_that_pillow_opens(tmp_path: Path) -> None:
    report = evaluate(size_band_scans(), bootstrap=10)
    path = tmp_path / "froc.png"
    plot_froc(report, path)
    with Image.open(path) as image:
        image.verify()
        assert image.format == "PNG"
        assert image.size == (640, 480)
    with Image.open(path) as image:  # something blue (the curve) was drawn
        colours = {c for _, c in image.convert("RGB").getcolors(maxcolors=1 << 16) or []}
        assert (0, 0, 255) in colours


def write_findings(folder: Path, uid: str, points: list[tuple[float, float, float, float]]) -> None:
    findings = tuple(
        Finding(
            id=i,
            probability=p,
            center_mm=(x, y, z),
            diameter_mm=6.0,
            volume_mm3=100.0,
            bbox_mm=((x - 3, y - 3, z - 3), (x + 3, y + 3, z + 3)),
            key_sop_instance_uid="1.2.3.4",
        )
        for i, (x, y, z, p) in enumerate(points, start=1)
    )
    report = FindingsReport("1.2.9", uid, "test", "0", findings)
    report.write(folder / f"{uid}.json")


def test_loads_findings_folder_and_dataset_json(tmp_path: Path) -> None:
    found = tmp_path / "findings"
    found.mkdir()
    write_findings(found, "1.2.840.1", [(10.0, 20.0, 30.0, 0.9), (90.0, 0.0, 0.0, 0.4)])
    write_findings(found, "1.2.840.2", [])
    dataset = tmp_path / "dataset.json"
    cases = [
        {"id": "case1", "lesions": [{"center_mm": [11, 20, 30], "diameter_mm": 6}]},
        {
            "id": "case2",
            "lesions": [{"center_mm": [0, 0, 0], "diameter_mm": 8}],
            "excluded_lesions": [{"center_mm": [5, 5, 5], "diameter_mm": 4}],
        },
    ]
    dataset.write_text(json.dumps({"cases": cases}), encoding="utf-8")
    mapping = {"case1": "1.2.840.1", "case2": "1.2.840.2"}

    truth = load_ground_truth(dataset, mapping)
    assert truth["1.2.840.2"] == ((nod(0, 0, 0, 8),), (nod(5, 5, 5, 4),))
    scans = build_scans(truth, load_detections(found))
    report = evaluate(scans, bootstrap=0)
    assert (report.n_scans, report.n_nodules, report.n_detected) == (2, 2, 1)
    assert report.n_false_positives == 1
    assert report.sensitivities == (0.5,) * 7

    with pytest.raises(FrocError, match="no findings file"):
        build_scans({**truth, "1.2.840.3": ((), ())}, load_detections(found))
    assert len(build_scans({**truth, "1.2.840.3": ((), ())}, {}, missing_ok=True)) == 3
    with pytest.raises(FrocError, match="not in the ground truth"):
        build_scans(load_ground_truth(dataset), load_detections(found))  # ids are not UIDs


def test_froc_does_not_load_torch() -> None:
    code = (
        "import sys, training.froc\n"
        "assert not {'torch', 'monai'} & set(sys.modules), 'torch loaded'\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, cwd=REPO
    )
    assert result.returncode == 0, result.stderr


# ------------------------------------------------------------------ detections CSV, comparison
def test_detections_csv_round_trips_in_luna16_submission_format(tmp_path: Path) -> None:
    scans = two_scans([det(0.125, -3.5, 1e-3, 0.9), det(50, 0, 0, 1 / 3)], [])
    path = tmp_path / "detections.csv"
    write_detections_csv(scans, path)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "seriesuid,coordX,coordY,coordZ,probability" and len(lines) == 3
    assert read_detections_csv(path) == {"A": scans[0].detections}  # exact floats
    # Columns by name, in any order; a bad row names its line.
    path.write_text("probability,seriesuid,coordZ,coordY,coordX\n0.5,X,3,2,1\n", "utf-8")
    assert read_detections_csv(path) == {"X": (det(1, 2, 3, 0.5),)}
    path.write_text("seriesuid,coordX,coordY,coordZ,probability\nX,1,2,oops,0.5\n", "utf-8")
    with pytest.raises(FrocError, match=r"detections.csv:2"):
        read_detections_csv(path)
    path.write_text("seriesuid,coordX,coordY,probability\n", "utf-8")
    with pytest.raises(FrocError, match="lacks coordZ"):
        read_detections_csv(path)


def many_scans(found: int, n: int = 30) -> list[Scan]:
    """n scans, each with one nodule and one FP (p 0.4); the first ``found`` nodules are hit
    with p 0.9."""
    return [
        Scan(
            f"s{i}",
            (nod(0, 0, 0, 10),),
            (det(0, 0, 0, 0.9),) * (i < found) + (det(90, 0, 0, 0.4),),
        )
        for i in range(n)
    ]


def test_compare_gives_a_paired_interval_for_the_cpm_difference() -> None:
    same = compare(many_scans(20), many_scans(20), bootstrap=200)
    assert same.difference == 0.0 and same.difference_ci == (0.0, 0.0)
    assert same.b_better_fraction == 0.0
    better = compare(many_scans(15), many_scans(24), bootstrap=500, seed=1)
    assert better.cpm_a == pytest.approx(0.5) and better.cpm_b == pytest.approx(0.8)
    assert better.difference == pytest.approx(0.3)
    lo, hi = better.difference_ci
    assert 0.0 < lo < 0.3 < hi  # B finds nodules A misses and never the reverse
    assert better.b_better_fraction == 1.0
    # Paired: the difference's interval is narrower than either CPM's own interval.
    own = evaluate(many_scans(15), bootstrap=500, seed=1).cpm_ci
    assert own is not None and hi - lo < own[1] - own[0]
    assert better.to_json()["bootstrap"]["difference_ci"] == [lo, hi]


def test_compare_refuses_evaluations_of_different_scans_or_truth() -> None:
    with pytest.raises(FrocError, match="same scans"):
        compare(many_scans(5), many_scans(5, n=29))
    other = many_scans(5)
    other[3] = Scan("s3", (nod(1, 0, 0, 10),), other[3].detections)
    with pytest.raises(FrocError, match="scan s3: the two evaluations have different"):
        compare(many_scans(5), other)
