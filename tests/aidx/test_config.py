"""Configuration: defaults, precedence, and errors that name the key, the value and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import SecretStr

from aidx.config import (
    AidxConfig,
    ConfigError,
    StrictModel,
    load_config,
    record_data_dir,
)
from aidx.config_show import MASK, redacted
from tests.conftest import REPO

NO_ENV: dict[str, str] = {}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "aidx.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_default_yaml_documents_exactly_the_embedded_defaults() -> None:
    documented = yaml.safe_load((REPO / "configs" / "default.yaml").read_text(encoding="utf-8"))
    embedded = AidxConfig().model_dump(mode="json")
    assert documented == embedded


def test_every_key_in_default_yaml_has_a_comment() -> None:
    lines = (REPO / "configs" / "default.yaml").read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or stripped.endswith(":"):
            continue  # comments and section headers
        assert lines[i - 1].strip().startswith("#"), f"key without a comment: {stripped}"


def test_loading_the_shipped_default_file_gives_the_defaults() -> None:
    assert load_config(REPO / "configs" / "default.yaml", env=NO_ENV) == AidxConfig()


def test_precedence_file_then_environment_then_flags(tmp_path: Path) -> None:
    path = write(tmp_path, "log:\n  level: WARNING\n  format: json\ndemo:\n  slices: 40\n")
    env = {"AIDX_LOG__LEVEL": "ERROR", "AIDX_DEMO__NODULES": "7"}
    config = load_config(path, env=env, overrides={"demo.slices": 50})
    assert config.log.level == "ERROR"  # environment beats the file
    assert config.log.format == "json"  # the file beats the defaults
    assert config.demo.nodules == 7  # environment values are parsed, not strings
    assert config.demo.slices == 50  # flags beat everything


def test_aidx_config_environment_variable_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "data_dir: /srv/aidx\n")
    config = load_config(env={"AIDX_CONFIG": str(path)})
    assert config.data_dir == Path("/srv/aidx")


def test_unknown_key_names_its_path_and_suggests_the_right_one(tmp_path: Path) -> None:
    path = write(tmp_path, "log:\n  levl: DEBUG\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, env=NO_ENV)
    message = str(err.value)
    assert "log.levl: unknown key" in message
    assert str(path) in message
    assert "did you mean 'level'" in message
    assert "allowed here: format, level" in message


def test_bad_value_names_key_value_source_and_what_is_allowed(tmp_path: Path) -> None:
    path = write(tmp_path, "log:\n  level: LOUD\ndemo:\n  slices: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, env=NO_ENV)
    problems = err.value.problems
    assert len(problems) == 2
    level = next(p for p in problems if p.startswith("log.level"))
    assert "'LOUD'" in level and "'DEBUG'" in level and "'ERROR'" in level and str(path) in level
    slices = next(p for p in problems if p.startswith("demo.slices"))
    assert "got 3" in slices and "greater than or equal to 8" in slices


def test_bad_environment_value_names_the_variable() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(env={"AIDX_DEMO__MATRIX": "huge"})
    assert "demo.matrix: got 'huge' (from AIDX_DEMO__MATRIX)" in str(err.value)


def test_an_unknown_section_names_the_variable_and_the_fix() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(env={"AIDX_LOGS__LEVEL": "DEBUG"})
    assert "logs: unknown key (from AIDX_LOGS__LEVEL)" in str(err.value)
    assert "did you mean 'log'" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_config(env={"AIDX_LOG_LEVEL": "DEBUG"})  # one underscore where two are needed
    assert "log_level: unknown key (from AIDX_LOG_LEVEL)" in str(err.value)
    assert "did you mean AIDX_LOG__LEVEL? (two underscores between levels)" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_config(env={}, overrides={"demo_slices": 40})
    assert "did you mean 'demo.slices'?" in str(err.value)


def test_unknown_environment_key_is_an_error_not_ignored() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(env={"AIDX_DEMO__SLICE": "40"})
    assert "demo.slice: unknown key (from AIDX_DEMO__SLICE)" in str(err.value)
    assert "did you mean 'slices'" in str(err.value)


def test_invalid_yaml_reports_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "log:\n  level: [INFO\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, env=NO_ENV)
    assert "not valid YAML at line" in str(err.value)


def test_missing_file_says_so(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "nope.yaml", env=NO_ENV)
    assert "file not found" in str(err.value) and "--config" in str(err.value)


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="mapping"):
        load_config(write(tmp_path, "- a\n- b\n"), env=NO_ENV)


def test_redacted_masks_secret_fields_secret_keys_and_url_passwords() -> None:
    class Store(StrictModel):
        url: str = "postgresql://aidx:s3cret@db.example:5432/aidx"
        api_token: str = "abc123"
        password: SecretStr = SecretStr("hunter2")
        name: str = "plain"

    class WithSecrets(StrictModel):
        store: Store = Store()

    shown = redacted(WithSecrets())["store"]
    assert shown["url"] == f"postgresql://aidx:{MASK}@db.example:5432/aidx"
    assert shown["api_token"] == MASK
    assert shown["password"] == MASK
    assert shown["name"] == "plain"
    assert "s3cret" not in str(shown) and "hunter2" not in str(shown)


def test_without_a_data_dir_a_command_finds_the_folder_aidx_serve_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`aidx status` run from another folder used to look for ./aidx-data there and find "no
    store": the folder `aidx serve` records is used when none is configured and there is no
    ./aidx-data here; ./aidx-data, where it exists, and a configured folder still win."""
    env = {"XDG_STATE_HOME": str(tmp_path / "state")}
    served = tmp_path / "served" / "aidx-data"
    served.mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert load_config(env=env).data_dir == elsewhere / "aidx-data"  # nothing recorded yet
    record_data_dir(served, env)
    assert (tmp_path / "state" / "aidx" / "data-dir").read_text(encoding="utf-8").strip() == str(
        served
    )
    assert load_config(env=env).data_dir == served
    (elsewhere / "aidx-data").mkdir()  # a data folder here is this folder's own
    assert load_config(env=env).data_dir == elsewhere / "aidx-data"
    configured = tmp_path / "configured"
    assert load_config(env=env, overrides={"data_dir": str(configured)}).data_dir == configured
    # A recorded folder that is gone is not used.
    (elsewhere / "aidx-data").rmdir()
    served.rmdir()
    assert load_config(env=env).data_dir == elsewhere / "aidx-data"


def test_dicomweb_token_command_prints_a_peer_entry_that_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import hashlib

    from aidx.cli import main

    assert main(["dicomweb", "token", "pacs", "--read-only"]) == 0
    lines = capsys.readouterr().out.splitlines()
    token = lines[1].strip()
    entry = "\n".join(lines[3:])
    config = load_config(write(tmp_path, f"dicomweb:\n  port: 8042\n  peers:\n{entry}\n"), NO_ENV)
    (peer,) = config.dicomweb.peers
    assert peer.name == "pacs" and not peer.store and peer.read
    assert peer.token_sha256 == hashlib.sha256(token.encode()).hexdigest()
    assert token not in yaml.safe_dump(redacted(config))
    assert config.dicomweb.refusal() is None


def test_dicomweb_refusals_name_the_key_and_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(
            write(tmp_path, "dicomweb:\n  peers:\n  - name: pacs\n    token_sha256: secret\n"),
            NO_ENV,
        )
    assert "dicomweb.peers.0.token_sha256: not a hex SHA-256" in str(info.value)
    assert "aidx dicomweb token NAME" in str(info.value)
    empty = load_config(write(tmp_path, "dicomweb:\n  port: 8042\n"), NO_ENV).dicomweb
    assert "dicomweb.peers is empty" in str(empty.refusal())
    peer = {"name": "pacs", "token_sha256": "0" * 64}
    remote = load_config(
        env=NO_ENV,
        overrides={"dicomweb.port": 8042, "dicomweb.host": "0.0.0.0", "dicomweb.peers": [peer]},
    ).dicomweb
    assert "dicomweb.host is '0.0.0.0'" in str(remote.refusal())
    assert "dicomweb.certificate and dicomweb.private_key" in str(remote.refusal())


def test_a_destination_is_an_ae_or_a_dicomweb_root_and_errors_say_which_keys_go_together(
    tmp_path: Path,
) -> None:
    from aidx.config import DestinationConfig
    from aidx.config_dicomweb import DicomwebDestinationConfig

    config = load_config(
        write(
            tmp_path,
            "destinations:\n"
            "  pacs: {ae_title: PACS, host: 10.0.0.5, port: 104}\n"
            "  web: {dicomweb: 'https://pacs.example/dicom-web/', auth: {bearer_token: t0k}}\n",
        ),
        NO_ENV,
    )
    assert isinstance(config.destinations["pacs"], DestinationConfig)
    web = config.destinations["web"]
    assert isinstance(web, DicomwebDestinationConfig)
    assert web.studies_url == "https://pacs.example/dicom-web/studies"
    assert redacted(config)["destinations"]["web"]["auth"]["bearer_token"] == MASK

    with pytest.raises(ConfigError) as info:
        load_config(
            write(tmp_path, "destinations:\n  web: {dicomweb: 'http://x/dw', ae_title: P}\n"),
            NO_ENV,
        )
    message = str(info.value)
    assert "destinations.web.ae_title: unknown key" in message
    assert "a DICOM AE, with ae_title, host and port, or a DICOMweb root" in message
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, "destinations:\n  web: {dicomweb: 'ftp://x'}\n"), NO_ENV)
    assert "destinations.web.dicomweb: 'ftp://x' is not a DICOMweb root URL" in str(info.value)
