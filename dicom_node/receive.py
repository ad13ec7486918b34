"""Storing one received data set: the node's single receive path, whatever carried it.

The storage SCP (a C-STORE, :mod:`dicom_node.scp`) and STOW-RS (an ``application/dicom`` part,
:mod:`dicom_node.dicomweb.stow`) both hand the data set's bytes, as received, to
:meth:`Receiver.store`: parsed headers only (within the node's limits: data set size, inflated
size of a Deflated data set, sequence depth), a UID conflict refused before anything is
written, the file written with a fresh File Meta header and fsync'd into the spool, indexed,
and the study assembler told of a study opened (or of a study this node has not told it of: on
a store shared by several nodes another node may have opened it, and that node may die). Only
then may the caller report success.
"""

from __future__ import annotations

import errno
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace

from aidx.store.store import IndexOutcome, InstanceRecord, Store

from . import status
from .parse import InstanceError, ParseLimits, file_meta_bytes, parse_dataset, read_record
from .spool import DiskFloorError, Spool, valid_uid


@dataclass(frozen=True)
class Stored:
    record: InstanceRecord  # its path is not filled in
    outcome: IndexOutcome  # "new" or "duplicate"


class Receiver:
    """Spool, index and study assembly for received data sets (see the module doc)."""

    def __init__(
        self,
        store: Store,
        spool: Spool,
        limits: ParseLimits,
        on_study_opened: Callable[[str], None] | None = None,
    ) -> None:
        self.store = store
        self.spool = spool
        self.limits = limits
        self.on_study_opened = on_study_opened
        self._studies_told: OrderedDict[str, None] = OrderedDict()

    def store_dataset(
        self,
        dataset_bytes: bytes | memoryview,
        transfer_syntax: str,
        sop_uid: str,
        sop_class_uid: str,
        source: str,
        quiet_period_s: float,
        expect_study_uid: str | None = None,
    ) -> Stored:
        """Store one data set (its bytes in ``transfer_syntax``, without File Meta) that a
        sender announced as ``sop_class_uid``/``sop_uid``; ``source`` is the calling AE title
        (or the DICOMweb peer's name); ``expect_study_uid``: refuse a data set of another study.
        The outcome is "new" or "duplicate" (a re-send, stored again); raises
        :class:`InstanceError` with the DIMSE status and the reason, having left nothing
        behind."""
        if not valid_uid(sop_uid):
            raise InstanceError(status.CANNOT_UNDERSTAND, "the SOP Instance UID is invalid")
        if len(dataset_bytes) > self.limits.max_dataset_bytes:
            raise InstanceError(
                status.OUT_OF_RESOURCES,
                f"the data set of {len(dataset_bytes)} bytes exceeds node.max_dataset_mb "
                f"({self.limits.max_dataset_bytes} bytes); nothing was stored",
            )
        ds = parse_dataset(dataset_bytes, transfer_syntax, self.limits)
        meta = file_meta_bytes(sop_class_uid, sop_uid, transfer_syntax)
        size = len(meta) + len(dataset_bytes)
        record = read_record(ds, sop_uid, sop_class_uid, transfer_syntax, source, size)
        if expect_study_uid is not None and record.study_uid != expect_study_uid:
            raise InstanceError(
                status.DATASET_DOES_NOT_MATCH_SOP_CLASS,
                f"the instance is of study {record.study_uid}, not of the study "
                f"{expect_study_uid} it was sent to",
            )
        conflict = self.store.uid_conflict(record)
        if conflict:
            raise InstanceError(
                status.DUPLICATE_SOP_INSTANCE, f"{conflict}; the stored one is kept"
            )
        final = self.spool.path_for(record.study_uid, record.series_uid, sop_uid)
        existed = final.exists()
        try:
            path = self.spool.store(
                record.study_uid, record.series_uid, sop_uid, meta, dataset_bytes
            )
        except DiskFloorError as exc:
            raise InstanceError(status.OUT_OF_RESOURCES, str(exc)) from exc
        except OSError as exc:
            # A new file renamed into place before the failure (flushing its folder) goes too.
            if not existed:
                final.unlink(missing_ok=True)
            raise InstanceError(status.OUT_OF_RESOURCES, f"cannot write the file: {exc}") from exc
        try:
            result = self.store.index_instance(
                replace(record, path=str(path)), time.time(), quiet_period_s
            )
        except Exception as exc:
            # No success is sent, so nothing may stay behind: a new file goes (a re-sent one
            # replaced a file that is indexed already, and stays).
            if not existed:
                path.unlink(missing_ok=True)
            if _out_of_space(exc):
                raise InstanceError(
                    status.OUT_OF_RESOURCES, f"cannot index the instance: {exc}"
                ) from exc
            raise
        if result.outcome == "conflict":
            if not existed:
                path.unlink(missing_ok=True)
            raise InstanceError(
                status.DUPLICATE_SOP_INSTANCE, f"{result.conflict}; the stored one is kept"
            )
        if self.on_study_opened is not None:
            told = self._studies_told
            if result.study_opened or record.study_uid not in told:
                self.on_study_opened(record.study_uid)
                told[record.study_uid] = None
                if len(told) > _STUDIES_TOLD:
                    told.popitem(last=False)
        return Stored(record, result.outcome)


_STUDIES_TOLD = 1024  # recent studies remembered; an older one told again costs one wake-up


def _out_of_space(exc: BaseException) -> bool:
    """A write that failed because the disk is full (SQLite says so in words)."""
    text = str(exc).lower()
    return (
        getattr(exc, "errno", None) == errno.ENOSPC
        or "disk is full" in text
        or ("no space left" in text)
    )
