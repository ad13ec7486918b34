"""Shadow mode, evidence from practice and the promotion gate (issue 22), in one process: a
store, the worker with two stand-in ONNX models whose findings differ in a known way (the
challenger flags denser tissue only: fewer, other findings), radiologists' signed reviews, and
the `aidx models` commands.

One module-scoped run (three small studies, each read by the champion and then in shadow by the
challenger) serves every test, in this file's order: what the shadow run wrote and did not send
or show, the refusal before any evidence, the report on the signed studies (module fixture
``signed``) against figures counted here by hand, then the gate.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import yaml
from pydicom.uid import generate_uid
from sqlalchemy import select

from aidx.cli import main
from aidx.config import AidxConfig, load_config
from aidx.config_models import DriftConfig
from aidx.pipeline.metrics import StoreCollector
from aidx.pipeline.worker import Worker
from aidx.store.schema import events, outbox, results, shadow_runs
from aidx.store.store import Store
from dicom_node.parse import read_file
from inference.findings import Finding, FindingsReport
from models.registry import Registry
from tests.standin_model import card, soft_tissue_model
from training.converters import convert_phantom
from training.dataset import Dataset
from training.phantom import NoduleRequest, PhantomOptions, generate
from ui.accounts import Accounts, User
from ui.audit import Audit
from ui.drift import weekly
from ui.review import Reviews
from ui.signoff import sign

# `aidx` runs in-process under capsys (tests.conftest.fresh_logging)
pytestmark = pytest.mark.usefixtures("fresh_logging")

CHAMPION = "soft-tissue@0.0.1"
CHALLENGER = "soft-tissue@0.0.2"
STUDIES = 3


@dataclass
class Run:
    root: Path
    config_path: Path
    config: AidxConfig
    store: Store
    studies: list[str]
    reviews: Reviews
    radiologist: User


def _register(models: Path, root: Path, version: str, offset: float) -> None:
    onnx = soft_tissue_model(root / f"soft-tissue-{version}.onnx", offset)
    data = card(onnx)
    data["version"] = version
    data["input"]["spacing_mm"] = [5.0, 3.0, 3.0]  # a coarse grid: seconds per study, not tens
    path = root / f"card-{version}.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    Registry(models).register(onnx, path)


def _copies(dicom_dir: Path, out: Path, n: int) -> list[list[Path]]:
    """``n`` studies of the same images under new study, series and instance UIDs."""
    sources = sorted(dicom_dir.glob("*.dcm"))
    studies = []
    for k in range(n):
        folder = out / f"study-{k}"
        folder.mkdir(parents=True)
        study, series = generate_uid(), generate_uid()
        files = []
        for i, source in enumerate(sources):
            ds = pydicom.dcmread(source)
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            path = folder / f"{i:03d}.dcm"
            ds.save_as(path)
            files.append(path)
        studies.append(files)
    return studies


def _cli(run: Run, *args: str) -> int:
    return main(["--config", str(run.config_path), *args])


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("shadow")
    models = root / "models"
    _register(models, root, "0.0.1", 0.69)
    _register(models, root, "0.0.2", 0.72)
    Registry(models).promote("soft-tissue", "0.0.1")
    phantom = generate(
        root / "phantom",
        PhantomOptions(
            seed=5,
            slices=24,
            matrix=64,
            slice_thickness=2.5,
            nodule_requests=(NoduleRequest(14.0, "solid", "isolated", "smooth"),),
            workers=1,
            write_mask=True,
        ),
    )
    # The frozen gate dataset: the same phantom as a case of the canonical dataset.
    gate_set = Dataset(name="gate", description="one phantom", root=root / "gate-set")
    gate_set.cases.append(convert_phantom(root / "phantom", root / "gate-set", "phantom-5"))
    gate_set.write(root / "gate-set")
    settings = {
        "data_dir": str(root / "data"),
        "models": {
            "dir": str(models),
            "default": "soft-tissue",
            # min_shadow_studies: the studies of this run
            "gate": {
                "dataset": str(root / "gate-set"),
                "margin": 0.99,
                "fp_margin": 100.0,
                "min_shadow_studies": STUDIES,
                "bootstrap": 200,
            },
        },
        "inference": {"min_volume_mm3": 50, "intra_op_threads": 1},
        "destinations": {"PACS": {"ae_title": "PACS", "host": "127.0.0.1", "port": 1}},
    }
    config_path = root / "aidx.yaml"
    config_path.write_text(yaml.safe_dump(settings), encoding="utf-8")
    config = load_config(config_path, env={})
    config.data_dir.mkdir(parents=True)
    store = Store(config.store_url())
    accounts = Accounts(store)
    rad = accounts.add_user(
        "rad",
        "correct horse battery",
        role="radiologist",
        display_name="Smith^Anna",
        organisation="General Hospital",
    )
    reviews = Reviews(store, accounts.audit)
    state = Run(root, config_path, config, store, [], reviews, rad)
    # The challenger in shadow, by the command an engineer types.
    assert _cli(state, "models", "shadow", CHALLENGER) == 0
    for files in _copies(Path(phantom.dicom_dir), root / "studies", STUDIES):
        for path in files:
            record = replace(read_file(path.read_bytes(), "PACS"), path=str(path))
            store.index_instance(record, time.time() - 10.0, 1.0)
        state.studies.append(record.study_uid)
    for uid in state.studies:
        store.complete_study(uid, time.time())
    worker = Worker(config, store)
    while worker.run_once():
        pass
    yield state
    store.close()


def _result(store: Store, study_uid: str, shadow: bool) -> dict[str, Any]:
    (row,) = [r for r in store.study_results(study_uid) if r["shadow"] is shadow]
    return row


def test_the_challenger_reads_every_study_after_the_live_jobs_and_nothing_leaves(
    run: Run, capsys: pytest.CaptureFixture[str]
) -> None:
    store = run.store
    with store.engine.connect() as conn:
        timeline = [r.event for r in conn.execute(select(events.c.event).order_by(events.c.id))]
        sent = conn.execute(select(outbox.c.item_key, outbox.c.files)).all()
    # Lower priority: the three live jobs first, then the shadow runs.
    last_live = max(i for i, e in enumerate(timeline) if e == "inference_done")
    assert timeline.count("inference_done") == STUDIES
    assert min(i for i, e in enumerate(timeline) if e == "shadow_started") > last_live
    assert [r["state"] for r in store.shadow_run_rows()] == ["done"] * STUDIES
    shadow_files = set()
    for uid in run.studies:
        champion, challenger = _result(store, uid, False), _result(store, uid, True)
        assert (champion["model"], challenger["model"]) == (CHAMPION, CHALLENGER)
        assert champion["series_uid"] == challenger["series_uid"]
        assert (
            "/shadow/" in challenger["sr_path"]
            and challenger["sr_sop_uid"] != champion["sr_sop_uid"]
        )
        shadow_files |= {challenger["sr_path"], challenger["seg_path"]}
    # The PACS outbox holds the champion's results only.
    assert len(sent) == STUDIES
    assert all(CHAMPION in key and CHALLENGER not in key for key, _ in sent)
    assert not shadow_files & {f for _, files in sent for f in json.loads(files)}
    # A later version of a study supersedes the champion's report, never the challenger's
    # (whose row came after it).
    previous = store.previous_result(run.studies[0], 2)
    assert previous is not None and previous["model"] == CHAMPION
    # `aidx status STUDY` lists both, the challenger's marked.
    assert _cli(run, "status", run.studies[0]) == 0
    assert f"{CHALLENGER} (shadow)" in capsys.readouterr().out
    # The worklist shows the champion's results only.
    worklist = run.reviews.worklist()
    assert sorted(w.study_uid for w in worklist) == sorted(run.studies)
    assert {w.model for w in worklist} == {CHAMPION}


def test_a_shadow_run_run_again_writes_the_same_objects(run: Run) -> None:
    store, uid = run.store, run.studies[0]
    before = _result(store, uid, True)
    (row,) = store.shadow_run_rows(uid)
    with store._write() as conn:  # as after a crash: the run is queued again
        conn.execute(
            shadow_runs.update().where(shadow_runs.c.id == row["id"]).values(state="queued")
        )
    assert Worker(run.config, store).run_once()
    after = _result(store, uid, True)
    assert after["sr_sop_uid"] == before["sr_sop_uid"] and after["sr_path"] == before["sr_path"]
    with store.engine.connect() as conn:
        n = conn.execute(select(results.c.id).where(results.c.study_uid == uid)).all()
    assert len(n) == 2  # the champion's and the challenger's, once each


def test_promotion_is_refused_without_evidence_and_says_what_is_missing(
    run: Run, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _cli(run, "models", "promote", CHALLENGER) == 1
    out, err = capsys.readouterr()
    assert "not promoted" in err and "Traceback" not in err
    assert f"missing: a gate evaluation against {CHAMPION}" in out
    assert f"aidx models gate-evaluate {CHALLENGER}" in out
    assert f"shadow mode: 0 signed studies (at least {STUDIES} needed)" in out
    assert f"missing: {STUDIES} more signed studies" in out
    assert _cli(run, "models", "promote", CHALLENGER, "--force") == 2
    assert "--reason" in capsys.readouterr().err
    assert Registry(run.config.models_dir()).active("soft-tissue").ref == CHAMPION  # type: ignore[union-attr]


def _findings(path: str) -> list[Finding]:
    return list(FindingsReport.read(Path(path)).findings)


def _corner(run: Run, study_uid: str) -> tuple[float, float, float]:
    rows = run.store.study_instances(study_uid)
    ds = pydicom.dcmread(rows[len(rows) // 2]["path"], stop_before_pixels=True)
    x, y, z = (float(v) for v in ds.ImagePositionPatient)
    step = 4 * float(ds.PixelSpacing[0])
    return (x + step, y + step, z)  # axial images: rows along +x, columns along +y


def _sign_studies(run: Run) -> list[dict[str, Any]]:
    """Three reads: (0) every AI finding accepted; (1) the first accepted, the others
    rejected, and the challenger's last finding added by the radiologist; (2) the first
    edited to 10 mm, the others rejected, and a finding far from both models' added. Returns
    each study's final read (positives, negatives) and both models' findings."""
    reads = []
    rows = {w.study_uid: w for w in run.reviews.worklist()}
    for k, uid in enumerate(run.studies):
        review = rows[uid].review_id
        champion = _findings(_result(run.store, uid, False)["findings_path"])
        challenger = _findings(_result(run.store, uid, True)["findings_path"])
        positives: list[tuple[tuple[float, float, float], float]] = []
        negatives: list[tuple[tuple[float, float, float], float]] = []
        for i, f in enumerate(champion):
            key = f"ai-{f.id}"
            if k == 0 or (i == 0 and k == 1):
                run.reviews.decide(review, key, "accept", run.radiologist)
                positives.append((f.center_mm, f.diameter_mm))
            elif i == 0:
                run.reviews.decide(review, key, "edit", run.radiologist, diameter_mm=10.0)
                positives.append((f.center_mm, 10.0))
            else:
                run.reviews.decide(review, key, "reject", run.radiologist)
                negatives.append((f.center_mm, f.diameter_mm))
        if k == 1:
            last = challenger[-1]
            run.reviews.add(review, last.center_mm, last.diameter_mm, run.radiologist)
            positives.append((last.center_mm, last.diameter_mm))
        if k == 2:  # in the air near the corner of the middle image: no model finds it
            far = _corner(run, uid)
            run.reviews.add(review, far, 8.0, run.radiologist)
            positives.append((far, 8.0))
        sign(
            run.reviews,
            run.store,
            review,
            run.radiologist,
            run.config.data_dir / "signed",
            default_organisation="General Hospital",
        )
        reads.append(
            {"positives": positives, "negatives": negatives, "models": (champion, challenger)}
        )
    return reads


def _by_hand(reads: list[dict[str, Any]], low: float, high: float) -> dict[str, Any]:
    """Sensitivity and FP per study of each model in one band, counted directly: a finding
    detects a positive when its centre lies within the positive's radius; a finding detecting
    none is a false positive (binned by its own diameter)."""
    out: dict[str, Any] = {}
    for m, label in enumerate(("champion", "challenger")):
        positives = detected = fps = 0
        for read in reads:
            findings = read["models"][m]
            centres = np.array([f.center_mm for f in findings]).reshape(-1, 3)
            inside = np.zeros(len(findings), dtype=bool)
            for centre, diameter in read["positives"]:
                near = np.linalg.norm(centres - np.array(centre), axis=1) <= diameter / 2
                inside |= near
                if low <= diameter < high:
                    positives += 1
                    detected += bool(near.any())
            fps += sum(
                1
                for f, hit in zip(findings, inside, strict=True)
                if not hit and low <= f.diameter_mm < high
            )
        out[label] = {
            "positives": positives,
            "detected": detected,
            "sensitivity": detected / positives if positives else None,
            "fp_per_study": fps / len(reads),
        }
    return out


@pytest.fixture(scope="module")
def signed(run: Run) -> list[dict[str, Any]]:
    return _sign_studies(run)


def test_the_report_of_the_signed_studies_equals_the_figures_counted_by_hand(
    run: Run, signed: list[dict[str, Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    reads = signed
    out_json = run.root / "report.json"
    assert _cli(run, "models", "report", CHALLENGER, "--json", str(out_json)) == 0
    text = capsys.readouterr().out
    assert f"{CHALLENGER} in shadow: {STUDIES} signed studies (champion: {CHAMPION})" in text
    report = json.loads(out_json.read_text(encoding="utf-8"))
    assert report["studies"] == STUDIES
    bands = {b["band"]: b for b in report["bands"]}
    edges = {
        "all": (0.0, float("inf")),
        "<6 mm": (0.0, 6.0),
        "6-10 mm": (6.0, 10.0),
        "10-20 mm": (10.0, 20.0),
        ">=20 mm": (20.0, float("inf")),
    }
    assert set(bands) == set(edges)
    for name, (low, high) in edges.items():
        expected = _by_hand(reads, low, high)
        for label in ("champion", "challenger"):
            got = bands[name][label]
            for key in ("positives", "detected", "sensitivity", "fp_per_study"):
                assert got[key] == pytest.approx(expected[label][key]), (name, label, key)
        diff = bands[name]["fp_per_study_difference"]["value"]
        assert diff == pytest.approx(
            expected["challenger"]["fp_per_study"] - expected["champion"]["fp_per_study"]
        )
    overall = bands["all"]
    # The radiologist decided on every finding of the champion: its false positives are
    # findings that were rejected (those inside an accepted finding's radius are not).
    rejected = sum(len(r["negatives"]) for r in reads)
    champion_fps = overall["champion"]["false_positives"]
    assert 0 < champion_fps == overall["champion"]["false_positives_at_rejected"] <= rejected
    low, high = overall["sensitivity_difference"]["ci"]
    assert low <= overall["sensitivity_difference"]["value"] <= high


def test_the_gate_lets_the_challenger_through_once_evaluated_and_a_forced_one_is_audited(
    run: Run, signed: list[dict[str, Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    assert len(signed) == STUDIES
    registry = Registry(run.config.models_dir())
    assert _cli(run, "models", "gate-evaluate", CHALLENGER) == 0
    assert "recorded in the card" in capsys.readouterr().out
    (record,) = registry.get("soft-tissue", "0.0.2").card.gate
    assert record.champion == CHAMPION and record.passed
    assert _cli(run, "models", "promote", CHALLENGER) == 0
    out = capsys.readouterr().out
    assert "frozen dataset: CPM" in out and "missing" not in out
    assert registry.active("soft-tissue").ref == CHALLENGER  # type: ignore[union-attr]
    assert registry.shadow("soft-tissue") is None  # the challenger is the champion now
    assert _cli(run, "models", "rollback", "soft-tissue") == 0
    assert registry.active("soft-tissue").ref == CHAMPION  # type: ignore[union-attr]

    # A stricter gate (more shadow studies than there are) refuses; --force with a reason
    # promotes anyway, and the audit log says who, why and on what evidence.
    strict = yaml.safe_load(run.config_path.read_text(encoding="utf-8"))
    strict["models"]["gate"]["min_shadow_studies"] = 50
    strict_path = run.root / "strict.yaml"
    strict_path.write_text(yaml.safe_dump(strict), encoding="utf-8")
    base = ["--config", str(strict_path), "models", "promote", CHALLENGER]
    assert main(base) == 1
    assert main([*base, "--force", "--reason", "vendor recall of 0.0.1"]) == 0
    assert "forced past the gate" in capsys.readouterr().out
    (entry,) = Audit(run.store).query(action="model_promote_forced")
    assert entry.detail["model"] == CHALLENGER and entry.detail["previous"] == CHAMPION
    assert entry.detail["reason"] == "vendor recall of 0.0.1"
    assert any("47 more signed studies" in line for line in entry.detail["evidence"])
    assert _cli(run, "models", "rollback", "soft-tissue") == 0


def test_without_a_gate_dataset_the_gate_is_off_and_says_so(
    run: Run, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = yaml.safe_load(run.config_path.read_text(encoding="utf-8"))
    del settings["models"]["gate"]
    path = run.root / "no-gate.yaml"
    path.write_text(yaml.safe_dump(settings), encoding="utf-8")
    assert main(["--config", str(path), "models", "promote", CHAMPION]) == 0
    assert "gate: off (models.gate.dataset is not set)" in capsys.readouterr().out


def test_drift_watch_per_model_and_week_and_the_acceptance_alert(
    run: Run, signed: list[dict[str, Any]]
) -> None:
    accepted = sum(len(r["models"][0]) - len(r["negatives"]) for r in signed)
    rejected = sum(len(r["negatives"]) for r in signed)
    table = weekly(run.store)
    # The champion's results only (the challenger's are never reviewed), every study counted.
    assert set(table["model"]) == {CHAMPION} and table["results"].sum() == STUDIES
    assert table["decided"].sum() == accepted + rejected
    if len(table) == 1:  # (the run did not cross a Monday)
        (row,) = table.to_dict("records")
        assert row["acceptance_rate"] == pytest.approx(accepted / (accepted + rejected))
        assert row["findings_per_study"] == pytest.approx(
            sum(len(r["models"][0]) for r in signed) / STUDIES
        )
        assert row["slice_thickness"] == f"2.5 mm: {STUDIES}"
        assert row["scanners"].endswith(f": {STUDIES}") and "?" not in row["scanners"]

    def scrape(rule: DriftConfig) -> dict[tuple[str, str], float]:
        families = StoreCollector(run.store, rule).collect()
        return {
            (s.name, s.labels["model"]): s.value
            for f in families
            if f.name.startswith("aidx_model_")
            for s in f.samples
        }

    ratio = accepted / (accepted + rejected)
    strict = DriftConfig(min_acceptance=min(ratio + 0.1, 1.0), window_days=7, min_decided=1)
    for _ in range(2):  # the alert stays up; it is audited once per window
        gauges = scrape(strict)
        assert gauges[("aidx_model_acceptance_ratio", CHAMPION)] == pytest.approx(ratio)
        assert gauges[("aidx_model_drift_alert", CHAMPION)] == 1.0
    (entry,) = Audit(run.store).query(action="model_drift_alert")
    assert entry.detail["model"] == CHAMPION and entry.detail["rejected"] == rejected
    relaxed = DriftConfig(min_acceptance=ratio / 2, window_days=7, min_decided=1)
    assert scrape(relaxed)[("aidx_model_drift_alert", CHAMPION)] == 0.0


def test_an_engineer_sees_the_challengers_findings_in_the_viewer_a_radiologist_does_not(
    run: Run,
) -> None:
    from ui.viewer_session import draw_marks, findings_table, open_review, study_view
    from ui.web import UiContext

    engineer = Accounts(run.store).add_user(
        "eng", "correct horse battery", role="engineer", display_name="Engineer"
    )
    ctx = UiContext(run.config, run.store, Accounts(run.store), run.reviews)
    uid = run.studies[0]
    (row,) = [w for w in run.reviews.worklist() if w.study_uid == uid]
    challenger = _findings(_result(run.store, uid, True)["findings_path"])
    champion = _findings(_result(run.store, uid, False)["findings_path"])

    def keys(user: User) -> tuple[list[str], list[str]]:
        st = open_review(ctx, user, row.review_id, None)
        table = findings_table(ctx, st, lambda key, **v: f"{key}:{v.get('model', '')}")
        return list(table.iloc[:, 0]), list(table.iloc[:, 1])

    rad_keys, _ = keys(run.radiologist)
    assert rad_keys == [f"ai-{f.id}" for f in champion]
    eng_keys, decisions = keys(engineer)
    assert eng_keys == rad_keys + [f"challenger-{f.id}" for f in challenger]
    assert decisions[len(rad_keys) :] == [f"decision_challenger:{CHALLENGER}"] * len(challenger)
    # Drawn in the challenger's colour on the slice of its centre, for the engineer only.
    st = open_review(ctx, engineer, row.review_id, None)
    view = study_view(ctx, row.review_id)
    target = challenger[-1]
    st.select(ctx, f"challenger-{target.id}")  # a click on its row: to its slice
    assert st.slice == round(view.patient_to_pixel(target.center_mm)[0])
    rgb = np.zeros((*view.shape, 3), dtype=np.uint8)
    draw_marks(ctx, st, view, rgb)
    assert (rgb == (255, 128, 0)).all(axis=-1).any()
    st.challenger = False  # what a radiologist's view holds
    rgb[:] = 0
    draw_marks(ctx, st, view, rgb)
    assert not (rgb == (255, 128, 0)).all(axis=-1).any()


def test_the_browser_viewer_s_routes_give_an_engineer_the_challengers_circles(run: Run) -> None:
    """What ui/viewer.js reads: study.json lists the challenger's findings (orange, status
    ``shadow``) and marks their slices; marks.png draws them; for an engineer only."""
    import io

    from fastapi.testclient import TestClient
    from PIL import Image

    from tests.ui.test_web import login
    from ui.web import UiContext, create_app

    accounts = Accounts(run.store)
    if accounts.get_user("eng2") is None:
        accounts.add_user("eng2", "correct horse battery", role="engineer", display_name="E")
    ctx = UiContext(run.config, run.store, accounts, run.reviews)
    client = TestClient(create_app(ctx)[1], base_url="http://127.0.0.1")
    uid = run.studies[1]
    (row,) = [w for w in run.reviews.worklist() if w.study_uid == uid]
    challenger = _findings(_result(run.store, uid, True)["findings_path"])
    assert challenger, "the challenger finds something on every study of this run"

    def described(user: str) -> dict[str, Any]:
        login(client, user, "correct horse battery")
        reader = accounts.get_user(user)
        assert reader is not None
        run.reviews.open(row.review_id, reader)  # what opening it in the viewer records
        answer = client.get(f"/viewer/study.json?review={row.review_id}")
        assert answer.status_code == 200, answer.text
        return dict(answer.json())

    def orange(pos: int) -> bool:
        png = client.get(f"/viewer/marks.png?review={row.review_id}&pos={pos}&ov=1")
        assert png.status_code == 200, png.text
        rgba = np.asarray(Image.open(io.BytesIO(png.content)).convert("RGBA"))
        return bool(((rgba[..., :3] == (255, 128, 0)).all(axis=-1) & (rgba[..., 3] > 0)).any())

    shown = described("eng2")
    shadow = [f for f in shown["findings"] if f["status"] == "shadow"]
    assert [f["key"] for f in shadow] == [f"challenger-{f.id}" for f in challenger]
    assert {f["colour"] for f in shadow} == {"#ff8000"}
    pos = round(shadow[0]["pos"])
    assert pos in shown["marked"]
    assert orange(pos)
    shown = described("rad")
    assert not [f for f in shown["findings"] if f["status"] == "shadow"]
    assert not orange(pos)
