"""`aidx backup`, `aidx restore` and `aidx verify` (issue 21): a backup made while a study is
being received and a job runs restores into a fresh folder that `verify --deep` passes and that
shows the same worklist, reviews and audit log; the next backup copies only what changed; the
feedback key is left out unless asked; a flipped byte and a missing file are found."""

from __future__ import annotations

import contextlib
import io
import json
import sqlite3
import stat
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import select

from aidx.cli import main
from aidx.cli.status import recent_status
from aidx.config import load_config
from aidx.keys import secret_key, secret_problems
from aidx.store.protect.backup import BackupReport, backup
from aidx.store.protect.manifest import Manifest
from aidx.store.protect.restore import restore
from aidx.store.protect.verify import verify
from aidx.store.schema import audit_log, reviews
from aidx.store.store import Store
from dicom_node.parse import read_file
from dicom_node.service import NodeService
from tests.aidx.instances import instance_record
from tests.aidx.signed_site import Site, open_site, signed_site
from tests.conftest import require_tool
from tests.peers import LOOPBACK, free_port, storescu
from tests.peers.dcmtk import storescu_command
from training.phantom import PhantomOptions, generate
from ui.accounts import Accounts
from ui.review import Reviews

FEEDBACK_KEY = "ab" * 32


@dataclass
class Scene:
    site: Site
    config_file: Path
    receiving_uid: str  # the study being received during the backup
    backup_dir: Path
    first: BackupReport
    restored: Path
    worklist: list[Any]  # the site's, when the backup was made
    reviews: list[Any]
    audit: list[Any]
    status: list[dict[str, Any]]  # `aidx status` of the signed study


def aidx(*args: str) -> subprocess.CompletedProcess[str]:
    """`aidx ARGS`, the command line's own code run in this process (no interpreter start per
    command), its output captured."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return subprocess.CompletedProcess(["aidx", *args], code, out.getvalue(), err.getvalue())


def rows(store: Store, table: Any) -> list[tuple[Any, ...]]:
    with store.engine.connect() as conn:
        return [tuple(r) for r in conn.execute(select(table).order_by(table.c.id))]


def worklist(store: Store) -> list[Any]:
    return Reviews(store, Accounts(store).audit).worklist()


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> Scene:
    require_tool("storescu", "dcmtk")
    base = tmp_path_factory.mktemp("backup")
    site = open_site(signed_site(base / "site"))
    key = site.config.data_dir / "feedback.key"
    key.write_text(FEEDBACK_KEY, encoding="utf-8")
    key.chmod(0o600)
    secret_key(site.config.data_dir, "deid")  # made: data_dir/keys/deid.key
    config_file = base / "site" / "aidx.yaml"
    config_file.write_text(
        yaml.safe_dump(
            {"data_dir": str(site.config.data_dir), "models": {"dir": str(site.config.models.dir)}}
        ),
        encoding="utf-8",
    )
    # A second study: its first images received and its job running (claimed, not finished)
    # before the backup; the rest arrive while the backup runs.
    files = sorted(
        generate(
            base / "second", PhantomOptions(slices=12, matrix=64, nodules=0, seed=8)
        ).dicom_dir.glob("*.dcm")
    )
    receiving_uid = read_file(files[0].read_bytes(), "PACS").study_uid
    site.config.node.port = free_port()
    site.config.node.study_quiet_period_s = 600.0
    node = NodeService(site.config, site.store, outbox=False)
    node.start()
    try:
        storescu(LOOPBACK, node.port, files[:6], called_aet=site.config.node.ae_title)
        assert site.store.complete_study(receiving_uid, time.time() + 601) is not None
        running = site.store.claim_job("test-worker", 600.0)
        assert running is not None and running.study_uid == receiving_uid
        command = storescu_command(
            LOOPBACK, node.port, files[6:], called_aet=site.config.node.ae_title
        )
        with subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) as late:
            first = backup(site.config, base / "backup", config_file=config_file)
            assert late.wait(timeout=120) == 0
    finally:
        node.stop()
    state = (
        worklist(site.store),
        rows(site.store, reviews),
        rows(site.store, audit_log),
        [s for s in recent_status(site.store, 20) if s["study_uid"] == site.study_uid],
    )
    restored = base / "restored"
    done = aidx("restore", str(base / "backup"), "--data-dir", str(restored))
    assert done.returncode == 0, done.stderr
    assert f"aidx --data-dir {restored} verify --deep" in done.stdout
    return Scene(site, config_file, receiving_uid, base / "backup", first, restored, *state)


def test_the_backup_holds_what_its_store_copy_lists_with_sizes_and_hashes(scene: Scene) -> None:
    manifest = Manifest.read(scene.backup_dir)
    assert manifest.missing == [] and manifest.store_file == "store/aidx.db"
    keys = set(manifest.files)
    assert {k.split("/")[0] for k in keys} == {"store", "storage", "models", "config"}
    assert "config/aidx.yaml" in keys
    assert any(k.startswith("storage/signed/") for k in keys)
    for key, entry in manifest.files.items():
        assert (scene.backup_dir / key).stat().st_size == entry.size, key
    # Left out unless asked: the feedback key (an HMAC key).
    assert not (scene.backup_dir / "secrets").exists()
    data_dir = scene.site.config.data_dir
    assert manifest.secrets_left_out == [
        str(data_dir / "feedback.key"),
        str(data_dir / "keys" / "deid.key"),
    ]


def test_the_restored_folder_verifies_and_shows_the_same_worklist_reviews_and_audit_log(
    scene: Scene,
) -> None:
    listed = aidx("--data-dir", str(scene.restored), "status", "--json")
    assert listed.returncode == 0, listed.stderr
    studies = json.loads(listed.stdout)["studies"]
    assert [s for s in studies if s["study_uid"] == scene.site.study_uid] == scene.status
    checked = aidx("--data-dir", str(scene.restored), "verify", "--deep")
    assert checked.returncode == 0, checked.stderr
    assert "all present" in checked.stdout and "against recorded SHA-256" in checked.stdout
    config_file = scene.restored / "config" / "aidx.yaml"
    assert yaml.safe_load(config_file.read_text())["models"]["dir"]  # the old one, for reference
    store = Store(f"sqlite:///{scene.restored / 'aidx.db'}", root=scene.restored)
    try:
        assert worklist(store) == scene.worklist
        # The same rows, but for the signed report's path: under the new folder.
        (restored_review,), (site_review,) = rows(store, reviews), scene.reviews
        path = reviews.c.keys().index("signed_sr_path")
        assert restored_review[:path] + restored_review[path + 1 :] == (
            site_review[:path] + site_review[path + 1 :]
        )
        assert Path(restored_review[path]).relative_to(scene.restored) == Path(
            site_review[path]
        ).relative_to(scene.site.config.storage_root())
        assert rows(store, audit_log) == scene.audit
        case = Reviews(store, Accounts(store).audit).case(scene.worklist[0].review_id)
        assert case.signed_sr_path is not None and case.signed_sr_path.is_file()
        assert case.signed_sr_path.is_relative_to(scene.restored)
        # The study being received: in the restored store as far as the backup's copy went,
        # every image it lists restored.
        receiving = store.study_instances(scene.receiving_uid)
        assert 6 <= len(receiving) <= 12
        assert all(Path(r["path"]).is_relative_to(scene.restored) for r in receiving)
        (job,) = store.study_jobs(scene.receiving_uid)
        assert job["state"] == "running"  # taken again when its lease ends
    finally:
        store.close()


def test_the_next_backup_copies_only_what_changed_and_secrets_only_when_asked(
    scene: Scene, tmp_path: Path
) -> None:
    again = aidx(
        "--config", str(scene.config_file), "backup", "--to", str(scene.backup_dir),
        "--include-secrets",
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
    manifest = Manifest.read(scene.backup_dir)
    later = len(scene.site.store.study_instances(scene.receiving_uid)) - len(
        [k for k in scene.first.manifest.files if scene.receiving_uid in k]
    )
    # The store copy, the images that arrived after the first backup's store copy, the keys.
    assert f"copied {1 + later + 2} files" in again.stdout, again.stdout
    assert f"{len(scene.first.manifest.files) - 1} unchanged" in again.stdout
    secret = scene.backup_dir / "secrets" / "feedback.key"
    assert secret.read_text() == FEEDBACK_KEY
    for path in (secret, scene.backup_dir / "secrets" / "keys" / "deid.key"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert manifest.secrets_included and manifest.files["secrets/feedback.key"].size == 64
    # Restored where aidx keeps them, as tight as aidx checks at start.
    keyed = tmp_path / "with-keys"
    restore(scene.backup_dir, keyed)
    assert secret_key(keyed, "deid") == secret_key(scene.site.config.data_dir, "deid")
    assert stat.S_IMODE((keyed / "keys").stat().st_mode) == 0o700
    assert stat.S_IMODE((keyed / "feedback.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((keyed / "aidx.db").stat().st_mode) == 0o600  # password hashes
    assert secret_problems(keyed) == []


def test_verify_finds_a_flipped_byte_and_a_missing_file(scene: Scene) -> None:
    store = Store(f"sqlite:///{scene.restored / 'aidx.db'}", root=scene.restored)
    try:
        study_uid = scene.site.study_uid
        image = Path(store.study_instances(study_uid)[0]["path"])
        data = bytearray(image.read_bytes())
        data[-10] ^= 0x01  # in the pixel data: the header still reads
        image.write_bytes(bytes(data))
        assert verify(store).ok  # same size: only the content check sees it
        flipped = aidx("--data-dir", str(scene.restored), "verify", "--deep")
        assert flipped.returncode == 1
        assert f"{image} differs from the backup's copy" in flipped.stderr
        assert "1 of" in flipped.stderr and "Traceback" not in flipped.stderr
        seg = store.study_jobs(study_uid)[0]["result_dir"]
        (Path(seg) / "seg.dcm").unlink()
        report = verify(store)
        assert [p for p in report.problems if "seg.dcm is missing" in p], report.problems
    finally:
        store.close()


def test_a_postgresql_store_is_dumped_and_restored_into_a_new_database(
    tmp_path: Path, postgres_server: Any
) -> None:
    """pg_dump on the snapshot that listed the files, pg_restore into an empty database given
    with --store-url; verify --deep passes there."""
    require_tool("pg_dump", "postgresql-client")
    url = str(postgres_server.new_database())
    config = load_config(env={}, overrides={"data_dir": str(tmp_path / "site"), "store.url": url})
    store = Store.for_config(config)
    try:
        for n in range(3):
            image = config.storage_root() / "spool" / "1.2.3" / f"{n}.dcm"
            image.parent.mkdir(parents=True, exist_ok=True)
            image.write_bytes(b"\0" * 128 + b"DICM" + bytes([n]) * 100)
            record = instance_record("1.2.3", n, path=str(image), size=image.stat().st_size)
            store.index_instance(record, 1.0, 1.0)
    finally:
        store.close()
    made = backup(config, tmp_path / "backup")
    assert made.manifest.store_file == "store/aidx.pgdump" and made.copied == 4
    target = str(postgres_server.new_database())
    restored = tmp_path / "restored"
    assert restore(tmp_path / "backup", restored, store_url=target).files == 4
    copy = Store(target, root=restored)
    try:
        assert sorted(Path(p).name for p in copy.indexed_paths()) == ["0.dcm", "1.dcm", "2.dcm"]
        assert verify(copy, deep=True, manifest=Manifest.read(tmp_path / "backup")).hashed == 3
    finally:
        copy.close()


def test_wrong_folders_and_a_damaged_backup_are_refused_with_the_reason(
    scene: Scene, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir = str(scene.site.config.data_dir)
    assert main(["--data-dir", data_dir, "backup", "--to", f"{data_dir}/backup"]) == 2
    assert "overlaps data_dir" in capsys.readouterr().err
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("not a backup")
    assert main(["--data-dir", data_dir, "backup", "--to", str(tmp_path / "other")]) == 2
    assert "is not empty and holds no aidx backup" in capsys.readouterr().err
    assert main(["--data-dir", str(tmp_path / "other"), "restore", str(scene.backup_dir)]) == 2
    assert "exists and is not empty: restore into a new folder" in capsys.readouterr().err
    key = next(k for k in Manifest.read(scene.backup_dir).files if k.startswith("storage/spool"))
    image = scene.backup_dir / key
    original = image.read_bytes()
    image.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    try:
        new = tmp_path / "new"
        assert main(["--data-dir", str(new), "restore", str(scene.backup_dir)]) == 2
    finally:
        image.write_bytes(original)
    err = capsys.readouterr().err
    assert f"{key}: its size or SHA-256 differs from the manifest's" in err
    assert f"{new} is incomplete: delete it" in err and "Traceback" not in err


def test_rows_of_an_older_aidx_and_files_outside_the_root_are_restored_relative(
    tmp_path: Path,
) -> None:
    """Absolute rows (written before paths were relative): under the old root they become
    relative; a file outside it (queued by `aidx send --queue`) goes to NEW/external/."""
    config = load_config(env={}, overrides={"data_dir": str(tmp_path / "site")})
    config.data_dir.mkdir()
    inside = config.storage_root() / "spool" / "1.2.3" / "1.dcm"
    outside = tmp_path / "elsewhere" / "2.dcm"
    for n, image in enumerate((inside, outside)):
        image.parent.mkdir(parents=True)
        image.write_bytes(b"image" * 10)
        old = Store(config.store_url())  # no root: an older aidx, absolute paths
        old.index_instance(instance_record("1.2.3", n, path=str(image), size=50), 1.0, 1.0)
        old.close()
    made = backup(config, tmp_path / "backup")
    assert {"storage/spool/1.2.3/1.dcm", f"external{outside}"} <= set(made.manifest.files)
    restored = tmp_path / "restored"
    assert restore(tmp_path / "backup", restored).rewritten == 2
    with sqlite3.connect(restored / "aidx.db") as db:
        recorded = sorted(p for (p,) in db.execute("SELECT path FROM instances"))
    assert recorded == [f"external{outside}", "spool/1.2.3/1.dcm"]
    copy = Store(f"sqlite:///{restored / 'aidx.db'}", root=restored)
    try:
        assert verify(copy, deep=True, manifest=Manifest.read(tmp_path / "backup")).hashed == 2
    finally:
        copy.close()
