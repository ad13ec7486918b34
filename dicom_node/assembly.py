"""Study assembly: a study is complete when no instance has arrived for its quiet period.

Completion records a job in the store (the pipeline runs it). An instance that arrives after
completion reopens the study ("updated"); it completes again, with a new job, once it settles.
The thread sleeps until the next study is due, and is woken when a study opens; it never polls
the receive path. It looks at the store at least every ``RECHECK_S`` too: on a store shared by
several nodes (issue 19), a study that another node opened and then died with is due here
although nothing arrived here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from aidx.background import BackgroundLoop
from aidx.store.store import Store

log = logging.getLogger("aidx.assembly")

RECHECK_S = 30.0


class StudyAssembler(BackgroundLoop):
    thread_name = "aidx-assembly"

    def __init__(
        self,
        store: Store,
        on_complete: Callable[[str, int], None] | None = None,
        priority: Callable[[str], int] | None = None,
    ) -> None:
        super().__init__()
        self.store = store
        self.on_complete = on_complete
        self.priority = priority

    def notify(self, *_args: object) -> None:
        """A study opened (or reopened): its deadline may come before the one being waited for."""
        self._wake.set()

    def run_once(self, now: float | None = None) -> float | None:
        """Complete every study that has settled; return when the next one is due, if any."""
        while True:
            current = time.time() if now is None else now
            nxt = self.store.next_completion()
            if nxt is None:
                return None
            study_uid, due = nxt
            if due > current:
                return due
            try:
                priority = self.priority(study_uid) if self.priority is not None else 0
            except Exception:
                log.exception("priority of study_uid=%s failed; using 0", study_uid)
                priority = 0
            job_id = self.store.complete_study(study_uid, current, priority)
            if job_id is not None:
                study = self.store.study(study_uid) or {}
                log.info(
                    "study complete: study_uid=%s instances=%s version=%s job=%d priority=%d",
                    study_uid,
                    study.get("instance_count"),
                    study.get("version"),
                    job_id,
                    priority,
                )
                if self.on_complete is not None:
                    self.on_complete(study_uid, job_id)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                due = self.run_once()
            except Exception:
                log.exception("study assembly failed; retrying in 5 s")
                due = time.time() + 5.0
            wait = RECHECK_S if due is None else max(due - time.time(), 0.0) + 0.01
            self._sleep(min(wait, RECHECK_S))
