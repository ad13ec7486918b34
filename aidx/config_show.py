"""The configuration as `aidx config show` prints it: plain data with every secret masked."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, SecretStr

MASK = "********"
_SECRET_KEY = re.compile(r"(password|secret|token|api_key|private_key)", re.IGNORECASE)
_URL_PASSWORD = re.compile(r"(?P<head>[a-z][a-z0-9+.-]*://[^:/@\s]+:)(?P<pw>[^@\s]+)(?P<tail>@)")


def redacted(config: BaseModel) -> dict[str, Any]:
    """The configuration as plain data with secrets masked: secret fields, keys that name a
    password or token, and passwords inside URLs."""
    data: dict[str, Any] = _redact(config, config.model_dump(mode="python"))
    return data


def _redact(model: BaseModel | None, data: Any) -> Any:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            sub = getattr(model, key, None) if isinstance(model, BaseModel) else None
            if (
                isinstance(sub, SecretStr)
                or (_SECRET_KEY.search(key) and isinstance(value, str) and value)
                or isinstance(value, SecretStr)
            ):
                out[key] = MASK
            else:
                out[key] = _redact(sub if isinstance(sub, BaseModel) else None, value)
        return out
    if isinstance(data, list):
        return [_redact(None, v) for v in data]
    if isinstance(data, SecretStr):
        return MASK
    if isinstance(data, Path):
        return str(data)
    if isinstance(data, str):
        return _URL_PASSWORD.sub(lambda m: m["head"] + MASK + m["tail"], data)
    return data


def dump_yaml(data: dict[str, Any]) -> str:
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
