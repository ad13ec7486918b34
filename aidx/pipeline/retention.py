"""The retention loop of `aidx serve`: applies ``storage.retention`` (aidx.store.retention)
every ``interval_s``, in the node's process."""

from __future__ import annotations

import logging

from aidx.background import BackgroundLoop
from aidx.config import RetentionConfig
from aidx.store.retention import plan, purge
from aidx.store.store import Store

log = logging.getLogger("aidx.retention")


class RetentionLoop(BackgroundLoop):
    thread_name = "aidx-retention"

    def __init__(self, store: Store, policy: RetentionConfig) -> None:
        super().__init__()
        self.store = store
        self.policy = policy

    def run_once(self) -> int:
        """Apply the rules once; returns how many images went."""
        return sum(purge(self.store, item) for item in plan(self.store, self.policy))

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
            except Exception:
                # A store or disk error this round (logged with its traceback): the next
                # round tries again; images are kept meanwhile.
                log.exception(
                    "retention: this round failed; trying again in %.0f s", self.policy.interval_s
                )
            self._sleep(self.policy.interval_s)
