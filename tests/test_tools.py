"""External tools: a missing one skips locally with the reason and fails in CI."""

from __future__ import annotations

import pytest

from tests import conftest


def test_missing_tool_skips_outside_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(conftest, "IN_CI", False)
    monkeypatch.setattr(conftest.shutil, "which", lambda *a, **k: None)
    with pytest.raises(pytest.skip.Exception, match="install Debian's 'dcmtk'"):
        conftest.require_tool("storescu", "dcmtk")


def test_missing_tool_fails_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(conftest, "IN_CI", True)
    monkeypatch.setattr(conftest.shutil, "which", lambda *a, **k: None)
    with pytest.raises(pytest.fail.Exception, match="storescu not found"):
        conftest.require_tool("storescu", "dcmtk")


def test_present_tool_is_found_by_absolute_path() -> None:
    # Absolute system paths only: pynetdicom's venv scripts must not shadow DCMTK's.
    assert conftest.require_tool("sh", "dash").startswith("/")
