"""The job queue and the inference worker, without the network: studies indexed from phantom
files, jobs recorded by completion, run by a worker with a stand-in ONNX model."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import highdicom as hd
import pydicom
import pytest

from aidx.config import AidxConfig, load_config
from aidx.pipeline.routing import priority_function, routes
from aidx.pipeline.worker import Worker
from aidx.store.jobs import Delivery, ResultRecord
from aidx.store.store import Store
from dicom_node.parse import read_file
from tests.standin_model import install
from training.phantom import NoduleRequest, PhantomOptions, generate


def _index(store: Store, files: list[Path], calling_ae: str = "PACS", at: float = 1000.0) -> str:
    study_uid = ""
    for path in files:
        record = replace(read_file(path.read_bytes(), calling_ae), path=str(path))
        store.index_instance(record, at, 1.0)
        study_uid = record.study_uid
    return study_uid


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("jobs")
    result = generate(
        root / "study",
        PhantomOptions(
            seed=5,
            slices=30,
            matrix=96,
            slice_thickness=2.5,
            nodule_requests=(NoduleRequest(14.0, "solid", "isolated", "smooth"),),
            workers=1,
        ),
    )
    return {"root": root, "files": sorted(Path(result.dicom_dir).glob("*.dcm"))}


def _config(tmp_path: Path, **pipeline: Any) -> AidxConfig:
    models = tmp_path / "models"
    install(models, tmp_path)
    config = load_config(
        env={},
        overrides={
            "data_dir": str(tmp_path / "data"),
            "models.dir": str(models),
            "models.default": "soft-tissue",
            "inference.min_volume_mm3": 3000,  # the stand-in's large components: a few findings
        },
    )
    config.destinations = {"PACS": {"ae_title": "PACS", "host": "127.0.0.1", "port": 1}}  # type: ignore[dict-item]
    for key, value in pipeline.items():
        setattr(config.pipeline, key, value)
    return config


def _store(url: str) -> Store:
    return Store(url)


def test_priority_then_age_order_and_optimistic_claims(store_url: str) -> None:
    store = _store(store_url)
    for n, (uid, priority) in enumerate([("1.2.3.1", 0), ("1.2.3.2", 0), ("1.2.3.3", 5)]):
        _insert_study(store, uid)
        store.complete_study(uid, 2000.0 + n, priority)
    order = [store.claim_job(f"host:{999_000 + n}:0", 60.0, alive=lambda _: True) for n in range(3)]
    assert [j.study_uid for j in order if j] == ["1.2.3.3", "1.2.3.1", "1.2.3.2"]
    assert store.claim_job("host:1:0", 60.0, alive=lambda _: True) is None
    assert store.job_counts()["running"] == 3


def test_a_dead_workers_job_is_taken_again_and_an_expired_lease_too(store_url: str) -> None:
    store = _store(store_url)
    _insert_study(store, "1.2.3.9")
    store.complete_study("1.2.3.9", 2000.0)
    first = store.claim_job("here:111:0", 60.0, now=3000.0, alive=lambda _: True)
    assert first is not None and first.attempts == 1
    # Same host, process alive, lease valid: nobody takes it.
    assert store.claim_job("here:222:0", 60.0, now=3001.0, alive=lambda _: True) is None
    # The holder's process is gone: taken again, attempt 2.
    again = store.claim_job("here:222:0", 60.0, now=3002.0, alive=lambda pid: pid != 111)
    assert again is not None and again.id == first.id and again.attempts == 2
    # Another host cannot see the pid; the lease running out is what frees it.
    assert store.claim_job("there:5:0", 60.0, now=3003.0, alive=lambda _: True) is None
    third = store.claim_job("there:5:0", 60.0, now=3100.0, alive=lambda _: True)
    assert third is not None and third.attempts == 3
    events = [e["event"] for e in store.study_events("1.2.3.9")]
    assert events.count("requeued") == 2 and events[0] == "complete"


def test_an_overtaken_version_is_superseded_not_run(store_url: str) -> None:
    store = _store(store_url)
    _insert_study(store, "1.2.3.7")
    store.complete_study("1.2.3.7", 2000.0)
    store.engine.dispose()
    with store.engine.begin() as conn:  # a late image reopened it, and it settled again
        conn.exec_driver_sql("UPDATE studies SET state='updated' WHERE study_uid='1.2.3.7'")
    store.complete_study("1.2.3.7", 2100.0)
    job = store.claim_job("h:1:0", 60.0, alive=lambda _: True)
    assert job is not None and job.study_version == 2
    states = {j["study_version"]: j["state"] for j in store.study_jobs("1.2.3.7")}
    assert states == {1: "superseded", 2: "running"}


def test_finishing_twice_queues_each_delivery_once_and_sent_closes_the_job(
    store_url: str,
) -> None:
    store = _store(store_url)
    _insert_study(store, "1.2.3.8")
    store.complete_study("1.2.3.8", 2000.0)
    job = store.claim_job("h:1:0", 60.0, alive=lambda _: True)
    assert job is not None
    record = ResultRecord("1.2.3.8.1", "m@1", "f.json", "/r/sr.dcm", "1.2.9", None, 0, None)
    delivery = Delivery("PACS", "result:1.2.3.8:v1:default:m@1", ["/r/sr.dcm"])
    assert store.finish_job(job, "h:1:0", [record], [delivery], 1.5)
    assert not store.finish_job(job, "h:1:0", [record], [delivery], 1.5)  # no longer running
    # A crash after finishing, then the same job run again: one result row, one outbox item.
    again = replace(job, attempts=2)
    with store.engine.begin() as conn:
        conn.exec_driver_sql(f"UPDATE jobs SET state='running', worker='h:2:0' WHERE id={job.id}")
    assert store.finish_job(again, "h:2:0", [record], [delivery], 1.0)
    assert len(store.study_results("1.2.3.8")) == 1
    items = store.outbox_items()
    assert len(items) == 1
    store.mark_sent(items[0].id)
    assert store.job(job.id)["state"] == "sent"  # type: ignore[index]


def test_a_finished_job_queues_its_shadow_run_once_which_a_dead_worker_loses_to_another(
    store_url: str,
) -> None:
    store = _store(store_url)
    _insert_study(store, "1.2.3.6")
    store.complete_study("1.2.3.6", 2000.0)
    job = store.claim_job("h:1:0", 60.0, alive=lambda _: True)
    assert job is not None
    record = ResultRecord("1.2.3.6.1", "m@1", "f.json", "/r/sr.dcm", "1.2.9", None, 0, None)
    assert store.finish_job(job, "h:1:0", [record], [], 1.0, ["m@2"])
    with store.engine.begin() as conn:  # the same job finished again after a crash
        conn.exec_driver_sql(f"UPDATE jobs SET state='running', worker='h:2:0' WHERE id={job.id}")
    assert store.finish_job(replace(job, attempts=2), "h:2:0", [record], [], 1.0, ["m@2"])
    (queued,) = store.shadow_run_rows("1.2.3.6")
    assert (queued["model"], queued["state"], queued["job_id"]) == ("m@2", "queued", job.id)
    # Claimed like a job: the holder's process gone, another worker takes it (attempt 2).
    run = store.claim_shadow("here:111:0", 60.0, now=3000.0, alive=lambda _: True)
    assert run is not None and run.attempts == 1
    assert store.claim_shadow("here:222:0", 60.0, now=3001.0, alive=lambda _: True) is None
    again = store.claim_shadow("here:222:0", 60.0, now=3002.0, alive=lambda pid: pid != 111)
    assert again is not None and again.id == run.id and again.attempts == 2
    assert not store.finish_shadow(run, "here:111:0", [], 1.0)  # no longer the first's
    shadow = replace(record, model="m@2", sr_path="/r/shadow/sr.dcm", sr_sop_uid="1.2.10")
    assert store.finish_shadow(again, "here:222:0", [shadow], 1.0)
    rows = {r["model"]: r for r in store.study_results("1.2.3.6")}
    assert rows["m@2"]["shadow"] and not rows["m@1"]["shadow"]
    assert [r["state"] for r in store.shadow_run_rows("1.2.3.6")] == ["done"]
    assert store.outbox_items() == []  # neither job nor shadow run had a delivery
    assert store.claim_shadow("h:3:0", 60.0, alive=lambda _: True) is None


def test_worker_runs_a_study_writes_results_and_queues_them(
    phantom: dict[str, Any], tmp_path: Path, store_url: str
) -> None:
    config = _config(tmp_path)
    store = _store(store_url)
    study_uid = _index(store, phantom["files"])
    job_id = store.complete_study(study_uid, time.time())
    worker = Worker(config, store)
    assert worker.run_once()
    job = store.job(job_id)  # type: ignore[arg-type]
    assert job is not None and job["state"] == "results_ready", job
    assert job["model"] == "soft-tissue@0.0.1"
    (result,) = store.study_results(study_uid)
    sr = hd.sr.srread(result["sr_path"])
    assert sr.SOPInstanceUID == result["sr_sop_uid"]
    assert sr.StudyInstanceUID == study_uid
    (item,) = store.outbox_items()
    assert item.destination == "PACS" and item.files[0] == result["sr_path"]
    assert result["seg_path"] in item.files
    events = [e["event"] for e in store.study_events(study_uid)]
    assert events == [
        "complete",
        "inference_started",
        "inference_done",
        "send_queued",
        "results_ready",
    ]
    # The same study updated by late images: version 2 supersedes version 1's report.
    with store.engine.begin() as conn:
        conn.exec_driver_sql(f"UPDATE studies SET state='updated' WHERE study_uid='{study_uid}'")
    store.complete_study(study_uid, time.time())
    assert worker.run_once()
    v1, v2 = store.study_results(study_uid)
    new = pydicom.dcmread(v2["sr_path"])
    assert new.SOPInstanceUID != v1["sr_sop_uid"]
    predecessor = new.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0]
    assert predecessor.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == v1["sr_sop_uid"]


def test_a_route_can_send_the_key_slices_as_a_kos(
    phantom: dict[str, Any], tmp_path: Path, store_url: str
) -> None:
    """``outputs: {PACS: [sr, kos]}``: the SR and a Key Object Selection of the key slices go
    to the PACS, the SEG does not."""
    config = _config(tmp_path)
    config.pipeline.routes = [{"name": "chest", "outputs": {"PACS": ["sr", "kos"]}}]  # type: ignore[list-item]
    config = AidxConfig.model_validate(json.loads(config.model_dump_json()))
    store = _store(store_url)
    study_uid = _index(store, phantom["files"])
    store.complete_study(study_uid, time.time())
    assert Worker(config, store).run_once()
    (result,) = store.study_results(study_uid)
    (item,) = store.outbox_items()
    kos_path = Path(result["sr_path"]).with_name("kos.dcm")
    assert item.files == [result["sr_path"], str(kos_path)]
    kos = pydicom.dcmread(kos_path)
    assert kos.Modality == "KO" and kos.StudyInstanceUID == study_uid
    findings = json.loads(Path(result["findings_path"]).read_text(encoding="utf-8"))["findings"]
    flagged = {
        i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        for i in kos.ContentSequence
        if i.ValueType == "IMAGE"
    }
    assert flagged == {f["key_sop_instance_uid"] for f in findings}


def test_a_destination_can_get_the_cornerstone_sr_instead_of_the_standard_one(
    phantom: dict[str, Any], tmp_path: Path, store_url: str
) -> None:
    """``outputs: {PACS: [sr, seg], OHIF: [sr_cornerstone, seg]}``: each destination gets its
    variant of the report (docs/results.md), both with the same SEG."""
    config = _config(tmp_path)
    config.pipeline.routes = [  # type: ignore[list-item]
        {"name": "chest", "outputs": {"PACS": ["sr", "seg"], "OHIF": ["sr_cornerstone", "seg"]}}
    ]
    config.destinations["OHIF"] = config.destinations["PACS"]
    config = AidxConfig.model_validate(json.loads(config.model_dump_json()))
    store = _store(store_url)
    study_uid = _index(store, phantom["files"])
    store.complete_study(study_uid, time.time())
    assert Worker(config, store).run_once()
    (result,) = store.study_results(study_uid)
    items = {item.destination: item.files for item in store.outbox_items()}
    sr = Path(result["sr_path"])
    seg = str(sr.with_name("seg.dcm"))
    assert items == {"PACS": [str(sr), seg], "OHIF": [str(sr.with_name("sr-cornerstone.dcm")), seg]}
    standard, variant = (pydicom.dcmread(p) for p in (sr, sr.with_name("sr-cornerstone.dcm")))
    assert standard.SOPInstanceUID != variant.SOPInstanceUID
    assert standard.SeriesInstanceUID == variant.SeriesInstanceUID


def test_a_study_without_an_eligible_series_is_not_applicable_with_the_reason(
    phantom: dict[str, Any], tmp_path: Path, store_url: str
) -> None:
    config = _config(tmp_path)
    config.inference.series.min_slices = 500
    store = _store(store_url)
    study_uid = _index(store, phantom["files"])
    job_id = store.complete_study(study_uid, time.time())
    assert Worker(config, store).run_once()
    job = store.job(job_id)  # type: ignore[arg-type]
    assert job is not None and job["state"] == "not_applicable"
    assert "fewer than 500" in job["reason"]
    assert store.outbox_items() == []


def test_priority_rules_by_calling_ae_and_attribute(
    phantom: dict[str, Any], tmp_path: Path, store_url: str
) -> None:
    config = _config(tmp_path)
    config.pipeline.priority_rules = [
        {"priority": 10, "calling_ae_titles": ["ER_CT"]},  # type: ignore[list-item]
        {"priority": 20, "attributes": {"Modality": "^CT$"}, "calling_ae_titles": ["ER_CT"]},  # type: ignore[list-item]
    ]
    config = AidxConfig.model_validate(json.loads(config.model_dump_json()))
    store = _store(store_url)
    routine = _index(store, phantom["files"], calling_ae="WARD")
    priority = priority_function(config, store)
    assert priority(routine) == 0
    with store.engine.begin() as conn:
        conn.exec_driver_sql("UPDATE studies SET calling_ae='ER_CT'")
    assert priority(routine) == 20


def test_routes_name_unknown_destinations_with_the_fix(tmp_path: Path) -> None:
    config = _config(tmp_path)
    config.pipeline.routes = [{"name": "chest", "outputs": {"ARCHIVE": ["sr"]}}]  # type: ignore[list-item]
    config = AidxConfig.model_validate(json.loads(config.model_dump_json()))
    with pytest.raises(ValueError, match=r"unknown destinations \['ARCHIVE'\]; destinations: PACS"):
        routes(config)


def _insert_study(store: Store, uid: str) -> None:
    from aidx.store.schema import patients, studies

    with store.engine.begin() as conn:
        inserted = conn.execute(
            patients.insert().values(patient_key=uid, patient_id="X", issuer="")
        ).inserted_primary_key
        assert inserted is not None
        pk = inserted[0]
        conn.execute(
            studies.insert().values(
                study_uid=uid,
                patient_pk=pk,
                calling_ae="PACS",
                state="receiving",
                version=0,
                quiet_period_s=1.0,
                instance_count=1,
                bytes=1,
                first_arrival=1000.0,
                last_arrival=1000.0,
            )
        )


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_processes_opening_a_new_database_together_all_start(
    tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    """`aidx serve` and its `aidx worker` processes start together on a new database: each
    creates the missing tables, and none may fail because another created them first."""
    import threading

    server = request.getfixturevalue("postgres_server") if backend == "postgresql" else None
    for n in range(15 if server is None else 6):
        if server is None:
            url = f"sqlite:///{(tmp_path / f'race{n}.db').resolve()}"
        else:
            url = server.new_database()
        barrier = threading.Barrier(4)
        errors: list[BaseException] = []

        def open_store(
            url: str = url,
            barrier: threading.Barrier = barrier,
            errors: list[BaseException] = errors,
        ) -> None:
            barrier.wait()
            try:
                Store(url).close()
            except Exception as exc:  # noqa: BLE001 - collected and asserted below
                errors.append(exc)

        threads = [threading.Thread(target=open_store) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []


def test_workers_claiming_together_take_each_job_once(store_url: str) -> None:
    """Several workers (threads with their own names, as worker processes have) claim at the
    same moment: every job is taken by exactly one of them."""
    import threading

    store = _store(store_url)
    uids = [f"1.2.9.{n}" for n in range(24)]
    for n, uid in enumerate(uids):
        _insert_study(store, uid)
        store.complete_study(uid, 3000.0 + n)
    barrier = threading.Barrier(6)
    taken: dict[str, list[str]] = {}
    errors: list[BaseException] = []

    def work(n: int) -> None:
        name = f"host:{990_000 + n}:0"
        mine: list[str] = []
        own = _store(store_url)  # its own engine and lock, as a worker process has
        barrier.wait()
        try:
            while (job := own.claim_job(name, 60.0, alive=lambda _: True)) is not None:
                mine.append(job.study_uid)
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)
        finally:
            own.close()
        taken[name] = mine

    threads = [threading.Thread(target=work, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    claimed = [uid for mine in taken.values() for uid in mine]
    assert sorted(claimed) == sorted(uids)  # all taken, none twice
    assert store.job_counts()["running"] == len(uids)
    store.close()


def test_a_task_claims_its_own_job_once_and_takes_over_only_when_delivered_again(
    store_url: str,
) -> None:
    """pipeline.queue celery: a task names its job (JobQueue.claim_job_id)."""
    store = _store(store_url)
    for n, uid in enumerate(["1.2.3.41", "1.2.3.42"]):
        _insert_study(store, uid)
        store.complete_study(uid, 2000.0 + n)
    assert [(p, uid) for _, p, uid in store.queued_jobs()] == [(0, "1.2.3.41"), (0, "1.2.3.42")]
    (first_id, _, _), (second_id, _, _) = store.queued_jobs()
    job = store.claim_job_id(second_id, "a:111:0", 60.0, now=3000.0, alive=lambda _: True)
    assert job is not None and job.id == second_id  # the named job, not the oldest
    assert [i for i, _, _ in store.queued_jobs()] == [first_id]
    # Delivered twice while its worker lives: runs once.
    assert store.claim_job_id(second_id, "b:222:0", 60.0, now=3001.0, alive=lambda _: True) is None
    # Delivered again because its consumer is gone (another host: no pid to look at).
    taken = store.claim_job_id(
        second_id, "b:222:0", 60.0, takeover=True, now=3002.0, alive=lambda _: True
    )
    assert taken is not None and taken.attempts == 2
    store.finish_job(taken, "b:222:0", [], [], 1.0)
    assert store.claim_job_id(second_id, "c:3:0", 60.0, takeover=True, now=3003.0) is None
    assert store.claim_job_id(999_999, "c:3:0", 60.0, now=3004.0) is None


def test_job_priorities_map_onto_the_brokers_levels() -> None:
    from aidx.config import CeleryConfig
    from aidx.pipeline.dispatch import broker_priority, safe_broker_url

    levels = CeleryConfig(max_priority=9)
    assert [broker_priority(p, levels) for p in (0, 1, 50, 99, 100, 250)] == [0, 1, 5, 9, 9, 9]
    assert safe_broker_url("amqp://u:pw@host:5672/v") == "amqp://u:***@host:5672/v"


def test_a_route_with_its_own_queue_takes_the_studies_it_applies_to(tmp_path: Path) -> None:
    """pipeline.queue celery: a study goes to the queue of the first route with a queue whose
    conditions one of its series meets (from the store's series rows), else the default."""
    from aidx.config import RouteConfig
    from aidx.pipeline.routing import queue_function
    from tests.aidx.instances import instance_record

    routes = [
        RouteConfig(name="chest-gpu", queue="gpu", body_parts=["CHEST"]),
        RouteConfig(name="all"),
    ]
    config = _config(tmp_path, queue="celery", routes=routes)
    store = _store(f"sqlite:///{tmp_path / 'q.db'}")
    store.index_instance(instance_record("1.2.3.61", 1), 1000.0, 1.0)  # CHEST
    store.index_instance(instance_record("1.2.3.62", 1, body_part="ABDOMEN"), 1000.0, 1.0)
    queue_of = queue_function(config, store)
    assert queue_of("1.2.3.61") == "gpu"
    assert queue_of("1.2.3.62") == config.pipeline.celery.queue == "aidx"
