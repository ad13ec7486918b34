"""The `aidx` command as users run it: installed console script, exit codes and messages."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from aidx.cli import main


def aidx_command() -> list[str]:
    script = shutil.which("aidx", path=str(Path(sys.executable).parent))
    assert script, "the aidx console script is not installed in this environment"
    return [script]


def run(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("AIDX_")}
    full_env.update(env or {})
    return subprocess.run(
        aidx_command() + args,
        check=False,
        capture_output=True,
        text=True,
        env=full_env,
        timeout=300,
    )


def test_config_show_prints_the_effective_configuration() -> None:
    result = run(["config", "show"], env={"AIDX_LOG__LEVEL": "DEBUG"})
    assert result.returncode == 0, result.stderr
    shown = yaml.safe_load(result.stdout)
    assert shown["log"]["level"] == "DEBUG"
    assert shown["demo"]["slices"] == 300


def test_config_show_json() -> None:
    result = run(["--data-dir", "/tmp/x", "config", "show", "--format", "json"])
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["data_dir"] == "/tmp/x"


def test_bad_config_fails_at_start_with_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("demo:\n  matrix: 5000\n", encoding="utf-8")
    result = run(["--config", str(bad), "config", "check"])
    assert result.returncode == 2
    assert "demo.matrix: got 5000" in result.stderr
    assert "less than or equal to 1024" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_store_url_where_no_database_can_be_made_names_the_key(tmp_path: Path) -> None:
    """A folder that cannot be made (here under a plain file, which even root cannot make):
    the message names store.url and the fix, not SQLite's "unable to open database file"."""
    blocker = tmp_path / "a-file"
    blocker.write_text("", encoding="utf-8")
    url = f"sqlite:///{blocker}/state/aidx.db"
    result = run(
        ["--data-dir", str(tmp_path / "data"), "users", "list"], env={"AIDX_STORE__URL": url}
    )
    assert result.returncode == 2, result.stderr
    assert f"store.url {url}: cannot create {blocker}/state/aidx.db" in result.stderr
    assert "give a folder this account may write" in result.stderr
    assert "Traceback" not in result.stderr


def test_config_check_accepts_a_good_file(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("log:\n  format: json\n", encoding="utf-8")
    result = run(["--config", str(good), "config", "check"])
    assert result.returncode == 0
    assert "valid" in result.stdout


def test_phantom_command_writes_a_study(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "study"
    code = main(
        [
            "phantom",
            str(out),
            "--seed",
            "5",
            "--slices",
            "24",
            "--matrix",
            "128",
            "--nodules",
            "1",
            "--workers",
            "1",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "wrote 24 CT slices" in printed
    assert len(list((out / "dicom").glob("*.dcm"))) == 24
    truth = json.loads((out / "ground_truth.json").read_text(encoding="utf-8"))
    assert len(truth["nodules"]) == 1


def test_phantom_refuses_to_overwrite_without_the_flag(tmp_path: Path) -> None:
    args = [
        "phantom",
        str(tmp_path),
        "--seed",
        "1",
        "--slices",
        "8",
        "--matrix",
        "64",
        "--nodules",
        "0",
        "--workers",
        "1",
    ]
    assert run(args).returncode == 0
    again = run(args)
    assert again.returncode == 2
    assert "--overwrite" in again.stderr
    assert run([*args, "--overwrite"]).returncode == 0


def test_phantom_bad_option_is_a_clear_error(tmp_path: Path) -> None:
    result = run(["phantom", str(tmp_path), "--slices", "3"])
    assert result.returncode == 2
    assert "slices must be 8..2000, got 3" in result.stderr


def test_phantom_name_that_does_not_fit_the_charset(tmp_path: Path) -> None:
    result = run(
        [
            "phantom",
            str(tmp_path),
            "--slices",
            "8",
            "--matrix",
            "64",
            "--patient-name",
            "王^小明",
            "--charset",
            "ISO_IR 100",
        ]
    )
    assert result.returncode == 2
    assert "ISO_IR 192" in result.stderr and "GB18030" in result.stderr


def test_demo_writes_into_the_data_dir_and_says_where(tmp_path: Path) -> None:
    env = {"AIDX_DEMO__SLICES": "16", "AIDX_DEMO__MATRIX": "96", "AIDX_DEMO__NODULES": "1"}
    result = run(["--data-dir", str(tmp_path), "demo"], env=env)
    assert result.returncode == 0, result.stderr
    demo = tmp_path / "demo"
    assert f"wrote 16 CT slices to {demo / 'dicom'}" in result.stdout
    assert "synthetic" in result.stdout.lower()
    # Running it again regenerates the same study (idempotent), it does not fail.
    first = (demo / "ground_truth.json").read_text(encoding="utf-8")
    assert run(["--data-dir", str(tmp_path), "demo"], env=env).returncode == 0
    assert (demo / "ground_truth.json").read_text(encoding="utf-8") == first


def test_global_options_work_after_the_command_too() -> None:
    after = run(["config", "show", "--format", "json", "--data-dir", "/tmp/after"])
    assert after.returncode == 0, after.stderr
    assert json.loads(after.stdout)["data_dir"] == "/tmp/after"
    both = run(
        ["--data-dir", "/tmp/x", "config", "show", "--format", "json", "--data-dir", "/tmp/y"]
    )
    assert json.loads(both.stdout)["data_dir"] == "/tmp/y"  # the later one wins
    level = run(["config", "show", "--format", "json", "--log-level", "DEBUG"])
    assert json.loads(level.stdout)["log"]["level"] == "DEBUG"
    serve_help = run(["serve", "--help"])
    assert "global options (also before the command)" in serve_help.stdout
    assert "--data-dir" in serve_help.stdout and "--config" in serve_help.stdout
    # `aidx train --config` is the training configuration, as before
    train_help = run(["train", "--help"])
    assert "configs/train/X.yaml" in train_help.stdout


def test_a_reader_that_goes_away_is_not_an_error() -> None:
    """`aidx config show | head -1`: when the reader closes the pipe, aidx stops quietly."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIDX_")}
    process = subprocess.Popen(
        [*aidx_command(), "config", "show"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert process.stdout is not None and process.stderr is not None
    process.stdout.close()  # gone before aidx writes a line
    errors = process.stderr.read().decode()
    assert process.wait(timeout=120) == 0
    assert "Traceback" not in errors and "BrokenPipe" not in errors, errors
