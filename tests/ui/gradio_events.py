"""Gradio's browser protocol, spoken by a test as the page's script speaks it: the app's config
(components by elem_id, event handlers by trigger), an event sent with ``queue/join`` under a
page session (``session_hash``) and its result read from ``queue/data`` (server-sent events).

Works over any httpx client: FastAPI's TestClient (entered with ``with``, so that Gradio's
queue runs) or a plain ``httpx.Client`` against a real server.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from typing import Any

import httpx


class GradioEventError(AssertionError):
    """The event's handler failed (gr.Error) or Gradio refused it."""


@dataclass
class GradioPage:
    """One page load of a Gradio app mounted at ``prefix`` (e.g. ``/app/en``)."""

    client: httpx.Client
    prefix: str = "/app/en"
    session_hash: str = field(default_factory=lambda: secrets.token_hex(6))
    config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.config:
            response = self.client.get(f"{self.prefix}/config")
            assert response.status_code == 200, response.text
            self.config = response.json()

    def component(self, elem_id: str) -> int:
        found = [
            c["id"]
            for c in self.config["components"]
            if c.get("props", {}).get("elem_id") == elem_id
        ]
        assert len(found) == 1, f"no single component #{elem_id}"
        return int(found[0])

    def dependency(self, elem_id: str | None, event: str) -> dict[str, Any]:
        """The handler of ``event`` on ``#elem_id`` (None: the page itself, as for load)."""
        target = self.config["layout"]["id"] if elem_id is None else self.component(elem_id)
        found = [d for d in self.config["dependencies"] if [target, event] in d["targets"]]
        assert len(found) == 1, f"no single {event} handler on #{elem_id}"
        return found[0]

    def join(
        self,
        elem_id: str | None,
        event: str,
        values: dict[str, Any] | None = None,
        event_data: dict[str, Any] | None = None,
    ) -> httpx.Response:
        """Send the event (``values``: input values by elem_id; others, and State, None)."""
        dep = self.dependency(elem_id, event)
        by_id = {self.component(k): v for k, v in (values or {}).items()}
        body = {
            "data": [by_id.get(i) for i in dep["inputs"]],
            "event_data": event_data,
            "fn_index": dep["id"],
            "trigger_id": dep["targets"][0][0],
            "session_hash": self.session_hash,
        }
        return self.client.post(f"{self.prefix}/gradio_api/queue/join", json=body)

    def messages(self) -> list[dict[str, Any]]:
        """The page session's messages until Gradio closes the stream (its events are done)."""
        response = self.client.get(
            f"{self.prefix}/gradio_api/queue/data", params={"session_hash": self.session_hash}
        )
        assert response.status_code == 200, response.text
        return [
            json.loads(line[len("data: ") :])
            for line in response.text.splitlines()
            if line.startswith("data: ")
        ]

    def run(
        self,
        elem_id: str | None,
        event: str,
        values: dict[str, Any] | None = None,
        event_data: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Send the event and wait for it: its outputs by elem_id (those with one)."""
        joined = self.join(elem_id, event, values, event_data)
        if joined.status_code != 200:
            raise GradioEventError(f"queue/join: {joined.status_code} {joined.text}")
        event_id = joined.json()["event_id"]
        done = [
            m
            for m in self.messages()
            if m.get("msg") == "process_completed" and m.get("event_id") == event_id
        ]
        assert len(done) == 1, f"event {event_id} did not complete"
        if not done[0].get("success"):
            raise GradioEventError(str(done[0].get("output", {}).get("error")))
        ids = {c["id"]: c.get("props", {}).get("elem_id") for c in self.config["components"]}
        outputs = self.dependency(elem_id, event)["outputs"]
        data = done[0]["output"]["data"]
        return {ids[i]: v for i, v in zip(outputs, data, strict=True) if ids.get(i)}
