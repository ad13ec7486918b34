"""Who may read what aidx writes: files 0640 and folders 0750 under the data folder, a data
folder made before tightened at start, and TLS private keys that others can read refused.

Run as a user runs aidx: ``aidx serve`` receiving a study from ``aidx send`` and writing its
results, ``aidx outbox list`` on a loose data folder, ``aidx db backup``, ``aidx config check``,
``aidx ui``, and the node's start in-process with a throwaway key made with ``cryptography``.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric import ec

from aidx.cli import main
from aidx.config import TlsConfig, load_config
from aidx.permissions import DIR_MODE, FILE_MODE, STORE_FILE_MODE, private_key_problem
from aidx.store.store import Store
from dicom_node.service import NodeService
from dicom_node.tls import client_context, server_context
from inference.results_common import save_atomically
from tests.dicom_node.aidx_process import AidxSetup, aidx_env, destination
from tests.dicom_node.test_tls import _certificate, _write_cert, _write_key
from tests.peers import free_port, log_tail, poll_until
from tests.pipeline.harness import NODE_AET, pipeline_config
from tests.standin_model import install
from training.phantom import NoduleRequest, PhantomOptions, generate

OTHER_UID = 12345  # a user id that is neither root nor the test's


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def loose_modes(root: Path) -> list[str]:
    """Every folder under ``root`` (itself included) that is not 0750 and every file that is
    not 0640 (0600, stricter, is fine)."""
    wrong = [] if mode(root) == DIR_MODE else [f"{root}: {mode(root):04o}"]
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            path = Path(folder, name)
            if mode(path) != DIR_MODE:
                wrong.append(f"{path}: {mode(path):04o}")
        for name in files:
            path = Path(folder, name)
            if mode(path) not in (FILE_MODE, 0o600):
                wrong.append(f"{path}: {mode(path):04o}")
    return wrong


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("modes_study")
    result = generate(
        root / "study",
        PhantomOptions(
            seed=11,
            slices=24,
            matrix=96,
            slice_thickness=2.5,
            nodule_requests=(NoduleRequest(14.0, "solid", "isolated", "smooth"),),
            workers=1,
        ),
    )
    return Path(result.dicom_dir)


def _serving_setup(root: Path) -> AidxSetup:
    """`aidx serve` with one worker and the stand-in model, sending to itself as ``SELF``."""
    models = root / "models"
    install(models, root)
    node_port = free_port()
    config = pipeline_config(node_port, free_port(), models, quiet_period_s=0.5, min_slices=10)
    config["node"]["accept_any_calling_ae"] = True
    config["destinations"]["SELF"] = destination(NODE_AET, node_port)
    path = root / "aidx.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return AidxSetup(path, root / "data", node_port)


def test_everything_aidx_serve_writes_is_0640_in_0750_folders(
    study: Path, tmp_path: Path, umask_022: None
) -> None:
    """The store (with its -wal and -shm while it runs), the spool, the results and a backup of
    the store, though the shell that started aidx had umask 022."""
    setup = _serving_setup(tmp_path)
    study_uid = str(
        pydicom.dcmread(next(study.glob("*.dcm")), stop_before_pixels=True).StudyInstanceUID
    )
    log_path = tmp_path / "serve.log"
    with setup.serve(log_path, single_process=True) as process:
        sent = setup.run("send", str(study), "--to", "SELF")
        assert sent.returncode == 0, sent.stderr + log_tail(log_path)
        store = Store.for_config(setup.load())
        try:
            poll_until(
                lambda: bool(store.study_results(study_uid)),
                300.0,  # only so that a failure shows the log rather than the test's timeout
                "the study's results",
                process=process,
                log_path=log_path,
            )
            (result,) = store.study_results(study_uid)
        finally:
            store.close()
        data = setup.data_dir
        # While aidx runs, SQLite's -wal and -shm files exist: they are patient data too, and
        # with the store they hold the password hashes: the owner's alone.
        for name in ("aidx.db", "aidx.db-wal", "aidx.db-shm"):
            assert (data / name).is_file(), name
            assert mode(data / name) == STORE_FILE_MODE, name
        assert loose_modes(data) == []
    written = {Path(result["sr_path"]), Path(result["seg_path"]), Path(result["findings_path"])}
    assert all(p.is_file() and p.is_relative_to(data / "results") for p in written), written
    assert any((data / "spool").rglob("*.dcm"))
    backup = setup.run("db", "backup")
    assert backup.returncode == 0, backup.stderr
    found = re.search(r": (\S+) \(\d+ bytes\)$", backup.stdout.strip())
    assert found is not None, backup.stdout
    copy = Path(found.group(1))
    assert copy.is_file() and mode(copy) == FILE_MODE, backup.stdout
    assert loose_modes(data) == []


def test_a_data_folder_made_before_is_tightened_at_start(tmp_path: Path, umask_022: None) -> None:
    """A data folder that an older aidx left 0755 with a 0644 store: the next command makes the
    folder, what lies directly in it and the store (with its -wal and -shm) private. What lies
    deeper is not walked: other users cannot enter the 0750 folder to reach it."""
    data = tmp_path / "data"
    data.mkdir()
    url = f"sqlite:///{(data / 'aidx.db').resolve()}"
    store = Store(url)
    for made in data.glob("aidx.db*"):  # as an older aidx made them, under umask 022
        made.chmod(0o644)
    deep = data / "results" / "1.2.3" / "sr.dcm"
    deep.parent.mkdir(parents=True)
    deep.write_bytes(b"DICM")
    try:
        with store.engine.connect() as conn:  # an open connection keeps -wal and -shm
            conn.exec_driver_sql("CREATE TABLE IF NOT EXISTS held (x INTEGER)")
            conn.commit()
            for name in ("aidx.db", "aidx.db-wal", "aidx.db-shm"):
                assert mode(data / name) == 0o644, name
            assert mode(data) == 0o755 and mode(data / "results") == 0o755
            run = subprocess.run(
                [sys.executable, "-m", "aidx", "--data-dir", str(data), "outbox", "list"],
                capture_output=True,
                text=True,
                env=aidx_env(),
                check=False,
            )
            assert run.returncode == 0, run.stderr
            for name in ("aidx.db", "aidx.db-wal", "aidx.db-shm"):
                assert mode(data / name) == STORE_FILE_MODE, name
    finally:
        store.close()
    assert mode(data) == DIR_MODE and mode(data / "results") == DIR_MODE
    assert f"{data / 'aidx.db'} was mode 0644; changed to 0600" in run.stderr
    assert mode(deep) == 0o644  # below a 0750 folder: out of other users' reach


def test_result_files_are_0640_whatever_the_umask(
    study: Path, tmp_path: Path, umask_022: None
) -> None:
    """The writers of the AI results and of the radiologist's signed SR (ui.signoff) ask for
    0640 themselves, for callers that are not an aidx command."""
    ds = pydicom.dcmread(next(study.glob("*.dcm")))
    path = tmp_path / "results" / "signed.dcm"
    save_atomically(ds, path)
    assert mode(path) == FILE_MODE
    path.chmod(0o644)  # an older result, replaced by a new version
    save_atomically(ds, path)
    assert mode(path) == FILE_MODE


# ------------------------------------------------------------------------ private keys
def _key_pair(folder: Path, key_mode: int) -> tuple[Path, Path]:
    """A self-signed certificate and its private key, the key with ``key_mode``."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _write_cert(_certificate("AIDX", key, None), folder / "node.pem")
    key_path = _write_key(key, folder / "node.key")
    key_path.chmod(key_mode)
    return cert, key_path


def _node_config(tmp_path: Path, cert: Path, key: Path) -> Path:
    config = {
        "node": {
            "port": free_port(),
            "min_free_disk_mb": 0,
            "tls": {"enabled": True, "certificate": str(cert), "private_key": str(key)},
        },
        "pipeline": {"workers": 0},
        "metrics": {"port": 0},
        "ui": {"enabled": False},
    }
    path = tmp_path / "aidx.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def assert_names_the_fix(message: str, key: Path, key_mode: int) -> None:
    assert str(key) in message
    assert f"mode {key_mode:04o}" in message
    assert f"chmod 600 {key}" in message


def test_the_node_refuses_a_private_key_others_can_read(tmp_path: Path) -> None:
    cert, key = _key_pair(tmp_path, 0o644)
    config_path = _node_config(tmp_path, cert, key)
    config = load_config(config_path, env={}, overrides={"data_dir": str(tmp_path / "data")})
    service = NodeService(config)
    try:
        with pytest.raises(ValueError, match=r"node\.tls\.private_key") as refused:
            service.start()
    finally:
        service.stop()
        service.store.close()
    assert_names_the_fix(str(refused.value), key, 0o644)
    checked = subprocess.run(
        [sys.executable, "-m", "aidx", "--config", str(config_path), "config", "check"],
        capture_output=True,
        text=True,
        env=aidx_env(),
        check=False,
    )
    assert checked.returncode == 2, checked.stdout
    assert_names_the_fix(checked.stderr, key, 0o644)
    # Exports and `aidx echo`/`send` with that key as their client certificate: refused too.
    with pytest.raises(ValueError, match="chmod 600"):
        client_context(TlsConfig(enabled=True, certificate=cert, private_key=key))


def test_a_private_key_of_the_owner_alone_is_used(tmp_path: Path) -> None:
    cert, key = _key_pair(tmp_path, 0o600)
    tls = TlsConfig(enabled=True, certificate=cert, private_key=key)
    assert server_context(tls) is not None
    assert client_context(tls) is not None


def test_the_review_app_refuses_a_private_key_others_can_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    cert, key = _key_pair(tmp_path, 0o604)
    monkeypatch.setenv("AIDX_UI__CERTIFICATE", str(cert))
    monkeypatch.setenv("AIDX_UI__PRIVATE_KEY", str(key))
    assert main(["--data-dir", str(tmp_path / "data"), "ui", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "ui.private_key" in err
    assert_names_the_fix(err, key, 0o604)


@pytest.mark.skipif(os.geteuid() != 0, reason="changing a file's owner needs root")
@pytest.mark.parametrize(
    ("owner", "key_mode", "runs_as", "refused"),
    [
        (0, 0o640, OTHER_UID, False),  # root's key, group ssl-cert may read it
        (0, 0o644, OTHER_UID, True),
        (OTHER_UID, 0o600, OTHER_UID, False),
        (OTHER_UID, 0o640, OTHER_UID, True),  # the service's own key must be its own
        (OTHER_UID + 1, 0o600, OTHER_UID, True),  # another user's key
    ],
)
def test_private_keys_follow_postgresqls_rule(
    tmp_path: Path, owner: int, key_mode: int, runs_as: int, refused: bool
) -> None:
    _, key = _key_pair(tmp_path, key_mode)
    os.chown(key, owner, -1)
    problem = private_key_problem(key, euid=runs_as)
    assert (problem is not None) == refused, problem
    if problem is not None:
        assert str(key) in problem and "chmod 600" in problem
