"""Evidence from practice on a hand-made read: matching, sensitivity, FP per study, bands and the
paired bootstrap (training.practice); the store-backed path is tests/pipeline/test_shadow.py."""

from __future__ import annotations

import pytest

from inference.findings import Finding
from training.practice import Lesion, Scored, StudyEvidence, report, score


def _finding(center: tuple[float, float, float], diameter: float, n: int = 1) -> Finding:
    half = diameter / 2
    return Finding(
        id=n,
        center_mm=center,
        diameter_mm=diameter,
        volume_mm3=diameter**3 / 2,
        probability=0.9,
        bbox_mm=(
            (center[0] - half, center[1] - half, center[2] - half),
            (center[0] + half, center[1] + half, center[2] + half),
        ),
        key_sop_instance_uid="1.2.3",
    )


def test_a_finding_detects_a_positive_within_its_radius_once() -> None:
    positives = [Lesion((0.0, 0.0, 0.0), 8.0), Lesion((50.0, 0.0, 0.0), 12.0)]
    findings = [
        _finding((4.0, 0.0, 0.0), 5.0),  # on the boundary (distance 4 = 8 / 2): detects
        _finding((0.0, 3.0, 0.0), 5.0, 2),  # a second finding on it: not a false positive
        _finding((50.0, 6.5, 0.0), 7.0, 3),  # just outside 12 / 2: a false positive
    ]
    scored = score(findings, positives)
    assert scored.detected == (True, False)
    assert [f.center_mm for f in scored.false_positives] == [(50.0, 6.5, 0.0)]


def test_the_figures_by_band_and_the_paired_bootstrap() -> None:
    lesion = Lesion
    # Two studies read alike: positives of 8 and 12 mm, one rejected finding (5 mm). The
    # champion found the 8 mm one and the rejected one; the challenger both, nothing else.
    alike = StudyEvidence(
        "1",
        1,
        "s",
        "m@1",
        (lesion((0, 0, 0), 8), lesion((50, 0, 0), 12)),
        (lesion((90, 0, 0), 5),),
        Scored((True, False), (lesion((90, 0, 0), 5),)),
        Scored((True, True), ()),
    )
    # A third: one 4 mm positive the champion missed; the challenger found it and two more.
    third = StudyEvidence(
        "2",
        1,
        "s",
        "m@1",
        (lesion((0, 0, 0), 4),),
        (),
        Scored((False,), ()),
        Scored((True,), (lesion((30, 0, 0), 7), lesion((60, 0, 0), 25))),
    )
    r = report([alike, alike, third], "m@2", bootstrap=500)
    overall = r.band()
    assert (overall.champion.detected, overall.champion.positives) == (2, 5)
    assert (overall.challenger.detected, overall.challenger.positives) == (5, 5)
    assert overall.champion.fp_per_study == pytest.approx(2 / 3)
    assert overall.champion.at_negatives == 2
    assert overall.challenger.fp_per_study == pytest.approx(2 / 3)
    assert overall.sensitivity_difference.value == pytest.approx(3 / 5)
    assert overall.fp_difference.value == pytest.approx(0.0)
    # Every resample: the challenger detects all; the champion 1 of 2 per "alike" study and 0
    # of 1 in the third, so the difference lies between 1/2 (no third) and 1 (only the third).
    low, high = overall.sensitivity_difference.ci  # type: ignore[misc]
    assert 0.5 <= low <= 0.6 <= high <= 1.0
    small = r.band("<6 mm")  # the 4 mm positive; the champion's 5 mm false positives
    assert (small.champion.detected, small.challenger.detected, small.champion.positives) == (
        0,
        1,
        1,
    )
    assert small.champion.false_positives == 2 and small.challenger.false_positives == 0
    assert r.band(">=20 mm").challenger.false_positives == 1  # the 25 mm one
    assert r.band(">=20 mm").sensitivity_difference.value is None  # no positive there
    assert r.to_json()["studies"] == 3 and r.champions == ("m@1",)
