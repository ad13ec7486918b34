"""`aidx users` and `aidx audit`: accounts and the audit log from the command line."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from pathlib import Path

import pytest

import ui.accounts as accounts_module
from aidx.cli import main
from aidx.cli import users as cli_users
from aidx.cli.exit_codes import EXIT_OK, EXIT_USAGE
from aidx.store.store import Store
from ui.accounts import AUTH_FAILED_MESSAGE, Accounts, AuthError
from ui.audit import CSV_COLUMNS

PASSWORD = "correct horse battery"
Run = Callable[..., tuple[int, str, str]]


@pytest.fixture(autouse=True)
def _fast_scrypt(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(accounts_module, "SCRYPT_N", 2**4)
    monkeypatch.delenv("AIDX_CONFIG", raising=False)


@pytest.fixture
def aidx(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Run:
    """``aidx(*args, stdin="...")`` runs the command on tmp_path; returns (code, out, err)."""

    def run(*args: str, stdin: str = "") -> tuple[int, str, str]:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
        code = main(["--data-dir", str(tmp_path), *args])
        out, err = capsys.readouterr()
        return code, out, err

    return run


def store_of(tmp_path: Path) -> Store:
    return Store(f"sqlite:///{(tmp_path / 'aidx.db').resolve()}")


def test_the_cli_offers_the_roles_and_languages_of_the_accounts() -> None:
    assert cli_users.ROLES == accounts_module.ROLES
    assert cli_users.LANGUAGES == accounts_module.LANGUAGES


def test_users_add_list_and_log_in(aidx: Run, tmp_path: Path) -> None:
    code, out, err = aidx(
        "users",
        "add",
        "Alice",
        "--role",
        "radiologist",
        "--name",
        "Dr Alice Smith",
        "--organisation",
        "City Hospital",
        "--password-stdin",
        stdin=PASSWORD + "\n",
    )
    assert (code, err) == (EXIT_OK, "")
    assert "alice" in out
    code, out, err = aidx(
        "users",
        "add",
        "wang",
        "--role",
        "admin",
        "--name",
        "王丽",
        "--language",
        "zh",
        "--password-stdin",
        stdin="正确的马电池订书钉很长\r\n",
    )
    assert code == EXIT_OK, err
    code, out, _ = aidx("users", "list")
    assert code == EXIT_OK
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["USER", "ROLE", "NAME", "ORGANISATION"]
    assert lines[1].split()[:2] == ["alice", "radiologist"]
    assert "City Hospital" in lines[1]
    assert "active" in lines[1]
    assert lines[2].split()[:5] == ["wang", "admin", "王丽", "-", "zh"]
    assert "scrypt" not in out
    assert PASSWORD not in out
    store = store_of(tmp_path)
    try:
        accounts = Accounts(store)
        assert accounts.authenticate("alice", PASSWORD).user.organisation == "City Hospital"
        assert accounts.authenticate("wang", "正确的马电池订书钉很长").user.language == "zh"
    finally:
        store.close()


def test_users_add_refuses_bad_input_with_a_usage_error(aidx: Run) -> None:
    base = ("users", "add", "bob", "--role", "engineer", "--name", "Bob", "--password-stdin")
    code, _, err = aidx(*base, stdin="short\n")
    assert code == EXIT_USAGE
    assert "at least 10" in err
    code, _, err = aidx(*base, stdin="")
    assert code == EXIT_USAGE
    assert "standard input" in err
    assert aidx(*base, stdin=PASSWORD + "\n")[0] == EXIT_OK
    code, _, err = aidx(*base, stdin=PASSWORD + "\n")
    assert code == EXIT_USAGE
    assert "exists already" in err
    code, _, err = aidx("users", "add", "bob smith", *base[3:], stdin=PASSWORD + "\n")
    assert code == EXIT_USAGE
    assert "user name" in err
    with pytest.raises(SystemExit) as info:  # argparse: the role is checked before anything
        aidx("users", "add", "carol", "--role", "doctor", "--name", "C", "--password-stdin")
    assert info.value.code == EXIT_USAGE


def test_passwords_typed_twice_must_agree(
    aidx: Run, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    typed = iter([PASSWORD, PASSWORD, "a new long password", "a new long passwort"])
    monkeypatch.setattr("getpass.getpass", lambda prompt="": next(typed))
    code, _, err = aidx("users", "add", "alice", "--role", "radiologist", "--name", "Alice")
    assert code == EXIT_OK, err
    code, _, err = aidx("users", "passwd", "alice")
    assert code == EXIT_USAGE
    assert "differ" in err
    store = store_of(tmp_path)
    try:
        assert Accounts(store).authenticate("alice", PASSWORD).user.username == "alice"
    finally:
        store.close()


def test_users_passwd_and_disable(aidx: Run, tmp_path: Path) -> None:
    add = ("users", "add", "alice", "--role", "radiologist", "--name", "Alice")
    assert aidx(*add, "--password-stdin", stdin=PASSWORD + "\n")[0] == EXIT_OK
    code, out, err = aidx(
        "users", "passwd", "alice", "--password-stdin", stdin="a new long password\n"
    )
    assert (code, err) == (EXIT_OK, "")
    assert "changed" in out
    code, _, err = aidx("users", "passwd", "nobody", "--password-stdin", stdin=PASSWORD + "\n")
    assert code == EXIT_USAGE
    assert "no user named nobody" in err
    store = store_of(tmp_path)
    try:
        accounts = Accounts(store)
        with pytest.raises(AuthError, match=AUTH_FAILED_MESSAGE):
            accounts.authenticate("alice", PASSWORD)
        assert accounts.authenticate("alice", "a new long password").user.username == "alice"
        assert aidx("users", "disable", "alice")[0] == EXIT_OK
        with pytest.raises(AuthError):
            accounts.authenticate("alice", "a new long password")
    finally:
        store.close()
    assert "disabled" in aidx("users", "list")[1].splitlines()[1]
    code, _, err = aidx("users", "disable", "nobody")
    assert code == EXIT_USAGE
    assert "no user named nobody" in err
    assert aidx("users", "enable", "alice")[0] == EXIT_OK
    assert "active" in aidx("users", "list")[1].splitlines()[1]


def test_audit_list_and_export(aidx: Run, tmp_path: Path) -> None:
    add = ("users", "add", "alice", "--role", "radiologist", "--name", "Alice")
    assert aidx(*add, "--password-stdin", stdin=PASSWORD + "\n")[0] == EXIT_OK
    store = store_of(tmp_path)
    try:
        accounts = Accounts(store)
        with pytest.raises(AuthError):
            accounts.authenticate("alice", "wrong password!", client="10.0.0.9")
        accounts.authenticate("alice", PASSWORD, client="10.0.0.9")
    finally:
        store.close()
    code, out, _ = aidx("audit", "list", "--limit", "2")
    assert code == EXIT_OK
    lines = out.splitlines()
    assert lines[0].split() == ["TIME", "USER", "ROLE", "ACTION", "STUDY", "CLIENT", "DETAIL"]
    assert [line.split()[1:4] for line in lines[1:]] == [
        ["alice", "radiologist", "login"],
        ["alice", "radiologist", "login_failed"],
    ]
    assert "reason=wrong password" in lines[2]
    code, out, _ = aidx("audit", "list", "--action", "user_added")
    assert out.splitlines()[1].split()[1].startswith("cli")
    out_csv = tmp_path / "audit.csv"
    code, out, err = aidx("audit", "export", str(out_csv), "--since", "2000-01-01")
    assert (code, err) == (EXIT_OK, "")
    assert "3 audit entries" in out
    with out_csv.open(encoding="utf-8-sig", newline="") as f:
        rows = list(csv.reader(f))
    assert tuple(rows[0]) == CSV_COLUMNS
    assert [row[4] for row in rows[1:]] == ["user_added", "login_failed", "login"]
    code, out, _ = aidx("audit", "export", str(out_csv), "--since", "2999-01-01")
    assert code == EXIT_OK
    assert "0 audit entries" in out
    with out_csv.open(encoding="utf-8-sig", newline="") as f:
        assert [tuple(r) for r in csv.reader(f)] == [CSV_COLUMNS]
    code, _, err = aidx("audit", "export", str(tmp_path / "missing" / "a.csv"))
    assert code == EXIT_USAGE
    assert "cannot write" in err
    with pytest.raises(SystemExit) as info:
        aidx("audit", "list", "--since", "last tuesday")
    assert info.value.code == EXIT_USAGE


def test_commands_on_a_data_dir_without_a_store_say_what_to_give(aidx: Run, tmp_path: Path) -> None:
    for args in (("users", "list"), ("users", "disable", "alice"), ("audit", "list")):
        code, _, err = aidx(*args)
        assert code == EXIT_USAGE
        assert "no store at" in err
        assert "--data-dir" in err
    assert not (tmp_path / "aidx.db").exists()


def test_a_review_app_without_accounts_says_how_to_add_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from aidx.cli.ui import start_ui
    from aidx.config import load_config
    from ui.web import UiServer

    config = load_config(env={}, overrides={"data_dir": str(tmp_path), "ui.port": 0})
    store = Store.for_config(config)
    try:
        for accounts_exist in (False, True):
            server = start_ui(config, store)
            assert isinstance(server, UiServer)
            server.stop()
            printed = capsys.readouterr().out
            assert "aidx review app: http://" in printed
            hint = f"no accounts yet: add one with `aidx --data-dir {tmp_path} users add NAME"
            assert (hint in printed) is not accounts_exist, printed
            if not accounts_exist:
                Accounts(store).add_user("first", PASSWORD, role="admin", display_name="First")
    finally:
        store.close()
