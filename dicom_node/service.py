"""The node service that ``aidx serve`` runs: spool recovery, storage SCP, the DICOMweb service
(``dicomweb.port``), study assembly and (unless another process delivers) the export outbox,
started and stopped together."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

from aidx.config import AidxConfig
from aidx.store.store import Store

from .assembly import StudyAssembler
from .export import ExportWorker
from .parse import InstanceError, read_file
from .policy import NodeStartError
from .scp import StorageSCP
from .spool import Spool

if TYPE_CHECKING:  # imported when the service is on: uvicorn and Starlette cost every node
    # process (and each `aidx serve` child) half a second at start
    from .dicomweb.access import SessionCheck
    from .dicomweb.app import DicomwebServer

log = logging.getLogger("aidx.node")

RECOVERED_AE = "(recovered)"


class NodeService:
    def __init__(
        self,
        config: AidxConfig,
        store: Store | None = None,
        on_complete: Callable[[str, int], None] | None = None,
        priority: Callable[[str], int] | None = None,
        outbox: bool = True,
        sessions: SessionCheck | None = None,
    ) -> None:
        """``on_complete(study_uid, job_id)`` is told of each job recorded (to wake workers);
        ``priority(study_uid)`` gives a completed study's job priority; ``outbox`` False leaves
        delivery to another process (`aidx outbox run`, under `aidx serve`); ``sessions``
        checks a review-app session, so that people read through DICOMweb as they signed in
        (None: systems' tokens only)."""
        self.config = config
        self.sessions = sessions
        config.data_dir.mkdir(parents=True, exist_ok=True)
        self.store = store or Store.for_config(config)
        self.spool = Spool(
            config.storage_root() / "spool", config.node.min_free_disk_mb * 1024 * 1024
        )
        self.assembler = StudyAssembler(self.store, on_complete, priority)
        self.scp = StorageSCP(config.node, self.store, self.spool, self.assembler.notify)
        self.exporter = ExportWorker(config, self.store) if outbox else None
        self.dicomweb: DicomwebServer | None = None

    @property
    def port(self) -> int:
        return self.scp.port

    def start(self) -> None:
        self.scp.policy.check_startup()
        refusal = self.config.dicomweb.refusal() if self.config.dicomweb.enabled else None
        if refusal:
            raise NodeStartError(refusal)
        removed = self.spool.remove_partial_files()
        if removed:
            log.info("removed %d partial files left by an interrupted receive", removed)
        self.reindex_unindexed()
        self.assembler.start()
        if self.exporter is not None:
            self.exporter.start()
        self.scp.start()
        if self.config.dicomweb.enabled:
            from .dicomweb.app import DicomwebServer  # noqa: PLC0415 - only when it is on

            try:
                self.dicomweb = DicomwebServer(
                    self.config, self.scp.receiver, self.store, self.sessions
                )
            except (OSError, ValueError) as exc:
                self.stop()
                raise NodeStartError(str(exc)) from exc
            self.dicomweb.start()

    def stop(self) -> None:
        if self.dicomweb is not None:
            self.dicomweb.stop()
            self.dicomweb = None
        self.scp.stop()
        self.assembler.stop()
        if self.exporter is not None:
            self.exporter.stop()

    def reindex_unindexed(self) -> int:
        """Index files that reached the spool but not the index (a crash between the two).

        No success status was sent for them, but they are complete and fsync'd: keeping them
        loses nothing, and a re-send is then a harmless duplicate.
        """
        indexed = self.store.indexed_paths()
        added = 0
        for path in self.spool.files():
            if str(path) in indexed:
                continue
            try:
                record = replace(read_file(path.read_bytes(), RECOVERED_AE), path=str(path))
            except (InstanceError, OSError) as exc:
                log.warning("spool file %s cannot be re-indexed: %s", path, exc)
                continue
            self.store.index_instance(record, time.time(), self.config.node.study_quiet_period_s)
            added += 1
        if added:
            log.info("re-indexed %d files found in the spool but not in the index", added)
        return added
