"""Export SCU: sends files to configured destinations, now (``aidx send``) or through the
durable outbox (``aidx serve``): one association per item (for a DICOMweb destination, one
STOW-RS request: :mod:`dicom_node.dicomweb.client`), exponential backoff between attempts,
resumed after a restart, permanent failures kept with their last error.

Files are sent as stored. When the peer does not accept a file's transfer syntax, compressed
pixel data is decoded and the file is sent in explicit VR little endian instead.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.association import Association

from aidx.background import BackgroundLoop
from aidx.config import AidxConfig, DestinationConfig, OutboxConfig
from aidx.config_dicomweb import DicomwebDestinationConfig
from aidx.config_fhir import FhirConfig
from aidx.logs import exception_text
from aidx.store.store import OutboxItem, Store

from .client import no_delay, settle_reactor
from .dicomweb.client import StowError, stow_files
from .fhir import FhirSendError, is_fhir_item, put_report, report_prefix
from .tls import client_context

log = logging.getLogger("aidx.export")

UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
MAX_CONTEXTS = 128  # PS3.8: at most 128 presentation contexts per association
# New associations after one is lost mid-send (pynetdicom can lose a response under load).
RECONNECTS = 2


class SendError(RuntimeError):
    """The association could not be made, or the peer refused some files."""


@dataclass
class SendReport:
    sent: int = 0
    converted: int = 0
    failures: list[str] = field(default_factory=list)


def send_files(
    destination: DestinationConfig, calling_ae: str, files: Sequence[Path]
) -> SendReport:
    """Send ``files`` in one association; raises SendError unless every file is stored."""
    headers: list[tuple[Path, UID, UID]] = []
    for path in files:
        meta = dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"])
        headers.append((path, UID(meta.SOPClassUID), UID(meta.file_meta.TransferSyntaxUID)))
    ae = AE(ae_title=destination.calling_ae_title or calling_ae)
    ae.maximum_pdu_size = 0
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    for sop_class, syntax in sorted({(c, t) for _, c, t in headers}):
        ae.add_requested_context(sop_class, [syntax])
    for sop_class in sorted({c for _, c, _ in headers}):
        ae.add_requested_context(sop_class, list(UNCOMPRESSED))
    if len(ae.requested_contexts) > MAX_CONTEXTS:
        raise SendError(
            f"{len(ae.requested_contexts)} presentation contexts needed, at most 128 per "
            "association: send fewer kinds of objects at once"
        )
    tls_args = (
        (client_context(destination.tls), destination.host) if destination.tls.enabled else None
    )
    report = SendReport()
    pending = list(headers)
    for attempt in range(1 + RECONNECTS):
        assoc = ae.associate(
            destination.host, destination.port, ae_title=destination.ae_title, tls_args=tls_args
        )
        if not assoc.is_established:
            why = "rejected" if assoc.is_rejected else "aborted or unreachable"
            raise SendError(
                f"association to {destination.ae_title}@{destination.host}:{destination.port} "
                f"{why}" + (f" ({report.sent} files were sent before)" if report.sent else "")
            )
        no_delay(assoc)
        try:
            while pending and _send_one(assoc, *pending[0], report):
                pending.pop(0)
        finally:
            if assoc.is_established:
                assoc.release()
        if not pending:
            break
        # The association was lost under a file (its response with it): that file and the
        # rest go again on a new one; a file stored already is a duplicate the peer keeps once.
        log.warning(
            "association to %s lost after %d files; %s for the other %d",
            destination.ae_title,
            report.sent,
            "reconnecting" if attempt < RECONNECTS else "giving up",
            len(pending),
        )
    for path, _, _ in pending:
        report.failures.append(f"{path.name}: no response (association lost)")
    if report.failures:
        raise SendError("; ".join(report.failures[:5]) + _more(len(report.failures)))
    return report


def _more(n: int) -> str:
    return f" (and {n - 5} more)" if n > 5 else ""


def _send_one(
    assoc: Association, path: Path, sop_class: UID, syntax: UID, report: SendReport
) -> bool:
    """Send one file and count the outcome; False when the association was lost (the file
    is neither sent nor failed: the caller sends it again on a new association)."""
    if not assoc.is_established:
        return False
    accepted = {(cx.abstract_syntax, cx.transfer_syntax[0]) for cx in assoc.accepted_contexts}
    settle_reactor(assoc)
    try:
        return _store(assoc, path, sop_class, syntax, accepted, report)
    except RuntimeError:  # pynetdicom: the association ended while this file was sent
        return False


def _store(
    assoc: Association,
    path: Path,
    sop_class: UID,
    syntax: UID,
    accepted: set[tuple[Any, Any]],
    report: SendReport,
) -> bool:
    if (sop_class, syntax) in accepted:
        rsp = assoc.send_c_store(path)
    else:
        fallback = next((t for t in UNCOMPRESSED if (sop_class, t) in accepted), None)
        if fallback is None:
            report.failures.append(f"{path.name}: the peer accepts no transfer syntax for it")
            return True
        ds = dcmread(path)
        if not syntax.is_little_endian:
            report.failures.append(f"{path.name}: big endian files cannot be converted")
            return True
        if syntax.is_compressed:
            # Decodes pixel data and switches to explicit VR little endian. The same instance
            # in another encoding keeps its SOP Instance UID (pydicom makes a new one by default).
            ds.decompress(generate_instance_uid=False)
        # Keep the data set's own uncompressed syntax: pynetdicom re-encodes it in the accepted
        # one (explicit <-> implicit VR). Relabelling it instead makes pynetdicom refuse an
        # explicit VR data set for an implicit VR context.
        rsp = assoc.send_c_store(ds)
        report.converted += 1
    code = int(getattr(rsp, "Status", -1)) if rsp else -1
    if code in (0x0000, 0xB000, 0xB007, 0xB006):  # success, or warning: stored
        report.sent += 1
    elif code == -1:
        return False  # no response: the association was lost (or aborted on a DIMSE timeout)
    else:
        report.failures.append(f"{path.name}: status 0x{code:04X}")
    return True


def _stow(destination: DicomwebDestinationConfig, name: str, files: list[Path]) -> SendReport:
    return SendReport(sent=stow_files(destination, name, files))


def _put_report(config: FhirConfig, path: Path) -> SendReport:
    put_report(config, path)
    return SendReport(sent=1)


def backoff_s(attempts: int, outbox: OutboxConfig, rng: random.Random | None = None) -> float:
    """Delay before the next attempt after ``attempts`` failures (exponential, ±10 % jitter)."""
    base = min(outbox.initial_backoff_s * 2 ** max(attempts - 1, 0), outbox.max_backoff_s)
    return float(base * (rng or random).uniform(0.9, 1.1))


class ExportWorker(BackgroundLoop):
    """Delivers outbox items in the background; wakes when one is queued or due."""

    thread_name = "aidx-export"
    join_timeout_s = 30.0

    def __init__(self, config: AidxConfig, store: Store) -> None:
        super().__init__()
        self.config = config
        self.store = store

    def start(self) -> None:
        resumed = self.store.requeue_interrupted()
        if resumed:
            log.info("outbox: %d interrupted deliveries resumed", resumed)
        super().start()

    def deliver_due(self) -> int:
        """Attempt every item that is due now; returns how many were attempted."""
        attempted = 0
        while not self._stop.is_set():
            item = self.store.claim_due(time.time())
            if item is None:
                return attempted
            attempted += 1
            self._attempt(item)
        return attempted

    def _attempt(self, item: OutboxItem) -> None:
        send = self._sender(item)
        if send is None:
            return
        try:
            report = send()
        except Exception as exc:  # noqa: BLE001 - any failure is this attempt's, never a stuck item
            attempts = item.attempts + 1
            retry_at = None
            if attempts < self.config.outbox.max_attempts:
                retry_at = time.time() + backoff_s(attempts, self.config.outbox)
            # A library's exception text may quote a patient value (aidx.logs).
            known = SendError | StowError | FhirSendError
            error = str(exc) if isinstance(exc, known) else exception_text(exc)
            self.store.mark_attempt_failed(item.id, error, retry_at)
            log.warning(
                "outbox item %d to %s: attempt %d failed: %s%s",
                item.id,
                item.destination,
                attempts,
                exc,
                "" if retry_at else " (giving up; `aidx outbox retry` to try again)",
            )
            return
        self.store.mark_sent(item.id)
        log.info(
            "outbox item %d delivered to %s: %d files (%d converted)",
            item.id,
            item.destination,
            report.sent,
            report.converted,
        )

    def _sender(self, item: OutboxItem) -> Callable[[], SendReport] | None:
        """How to send ``item``; None when it is settled without sending (a FHIR report with a
        newer version queued; a destination no longer configured)."""
        files = [Path(f) for f in item.files]
        if is_fhir_item(item.item_key):
            newer = self.store.newer_version(item.id, report_prefix(item.item_key))
            if newer is not None:
                # Sent after its newer version, it would replace the final report with the
                # preliminary one: the newer goes instead (the outbox sends one at a time).
                self.store.mark_sent(item.id, superseded_by=newer)
                log.info("outbox item %d: superseded by item %d, not sent", item.id, newer)
                return None
            if len(files) != 1:
                self.store.mark_attempt_failed(item.id, "a FHIR item holds one report file", None)
                return None
            return partial(_put_report, self.config.fhir, files[0])
        destination = self.config.destinations.get(item.destination)
        if destination is None:
            self.store.mark_attempt_failed(
                item.id, f"destination {item.destination!r} is not configured", None
            )
            log.error("outbox item %d: destination %r not configured", item.id, item.destination)
            return None
        if isinstance(destination, DicomwebDestinationConfig):
            return partial(_stow, destination, item.destination, files)
        return partial(send_files, destination, self.config.node.ae_title, files)

    def _run(self) -> None:
        poll = self.config.outbox.poll_interval_s
        while not self._stop.is_set():
            try:
                self.deliver_due()
                nxt = self.store.next_due()
            except Exception:
                log.exception("outbox delivery failed; retrying")
                nxt = None
            self._sleep(poll if nxt is None else min(max(nxt - time.time(), 0.0) + 0.01, poll))
