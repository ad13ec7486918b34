"""aidx's secret keys at rest (aidx.keys): made 0600 in a 0700 folder whatever the umask; a key
or keys folder that other users can reach, or that another user owns, refused when any aidx
command starts and when the key is used, with the command that fixes it."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from aidx.cli import main
from aidx.keys import KEY_BYTES, SecretKeyError, secret_key, secret_problems
from training.feedback import FeedbackError, feedback_key

OTHER_UID = 12345
pytestmark = pytest.mark.usefixtures("fresh_logging")  # `aidx` runs in-process under capsys


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def test_a_key_is_made_once_for_its_owner_alone(tmp_path: Path, umask_022: None) -> None:
    key = secret_key(tmp_path, "deid")
    assert len(key) == KEY_BYTES
    assert mode(tmp_path / "keys") == 0o700
    assert mode(tmp_path / "keys" / "deid.key") == 0o600
    assert secret_key(tmp_path, "deid") == key  # kept: what it derives stays the same
    assert secret_problems(tmp_path) == []


@pytest.mark.parametrize(
    ("where", "loose", "fix"),
    [
        ("keys/deid.key", 0o640, "chmod 600"),
        ("keys", 0o750, "chmod 700"),
        ("feedback.key", 0o644, "chmod 600"),
    ],
)
def test_a_key_others_can_reach_stops_every_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str, loose: int, fix: str
) -> None:
    data = tmp_path / "data"
    secret_key(data, "deid")
    feedback_key(data)
    (data / where).chmod(loose)
    assert main(["--data-dir", str(data), "outbox", "list"]) == 2
    err = capsys.readouterr().err
    assert f"{data / where} has mode {loose:04o}" in err, err
    assert f"{fix} {data / where}" in err
    assert "Traceback" not in err
    if where == "feedback.key":
        with pytest.raises(FeedbackError, match="chmod 600"):
            feedback_key(data)
    else:
        with pytest.raises(SecretKeyError, match=fix):
            secret_key(data, "deid")
    (data / where).chmod(0o700 if where == "keys" else 0o600)
    assert main(["--data-dir", str(data), "outbox", "list"]) == 0


def test_a_file_that_holds_no_key_is_refused(tmp_path: Path) -> None:
    secret_key(tmp_path, "deid")
    (tmp_path / "keys" / "deid.key").write_text("not a key\n", encoding="ascii")
    with pytest.raises(SecretKeyError, match="restore it from the backup"):
        secret_key(tmp_path, "deid")


@pytest.mark.skipif(os.geteuid() != 0, reason="changing a file's owner needs root")
def test_a_key_of_another_user_is_refused(tmp_path: Path) -> None:
    secret_key(tmp_path, "deid")
    os.chown(tmp_path / "keys" / "deid.key", OTHER_UID, -1)
    (problem,) = secret_problems(tmp_path)
    assert f"owned by user id {OTHER_UID}" in problem and "chmod 600" in problem
