"""`aidx serve`, `echo`, `send` and `outbox`: the DICOM node's commands."""

from __future__ import annotations

import argparse
import hashlib
import logging
import sys
import time
from typing import TYPE_CHECKING

from aidx.cli.exit_codes import EXIT_FAILED, EXIT_OK, EXIT_USAGE

if TYPE_CHECKING:
    from aidx.config import AidxConfig, Destination, DestinationConfig
    from aidx.store.store import Store

log = logging.getLogger("aidx.cli")


def _any_destination(config: AidxConfig, name: str | None) -> Destination:
    """A configured destination (an AE or a DICOMweb root), or this node's own AE."""
    from aidx.config import ConfigError, DestinationConfig, TlsConfig

    if name is None:
        node = config.node
        host = "127.0.0.1" if node.host in ("0.0.0.0", "::") else node.host
        # Talking to ourselves: trust the CA that signs clients, else our own certificate
        # (self-signed or a chain that includes its CA), and present our certificate.
        tls = TlsConfig(
            enabled=node.tls.enabled,
            ca_certificates=node.tls.ca_certificates or node.tls.certificate,
            certificate=node.tls.certificate,
            private_key=node.tls.private_key,
        )
        return DestinationConfig(ae_title=node.ae_title, host=host, port=node.port, tls=tls)
    try:
        destination = config.destinations[name]
    except KeyError:
        known = ", ".join(sorted(config.destinations)) or "none configured"
        raise ConfigError(
            [f"destinations.{name}: unknown destination; configured: {known}"]
        ) from None
    return destination


def _destination(config: AidxConfig, name: str | None) -> DestinationConfig:
    """An AE to talk DIMSE to (a DICOMweb destination is refused with a message)."""
    from aidx.config import ConfigError, DestinationConfig

    destination = _any_destination(config, name)
    if not isinstance(destination, DestinationConfig):
        raise ConfigError(
            [
                f"destinations.{name} is a DICOMweb destination ({destination.dicomweb}): C-ECHO "
                "needs a DICOM AE; `aidx send --to` sends there by STOW-RS"
            ]
        )
    return destination


def echo(args: argparse.Namespace, config: AidxConfig) -> int:
    from aidx.config import ConfigError
    from dicom_node.client import echo

    try:
        destination = _destination(config, args.destination)
    except ConfigError as exc:
        print(f"aidx echo: {exc}", file=sys.stderr)
        return EXIT_USAGE
    ok, detail = echo(destination, config.node.ae_title)
    target = f"{destination.ae_title}@{destination.host}:{destination.port}"
    if ok:
        print(f"C-ECHO {target}: {detail}")
        return EXIT_OK
    print(
        f"aidx echo: C-ECHO {target} failed: {detail}; check that a DICOM service listens there, "
        "that it knows this AE title, and the TLS settings",
        file=sys.stderr,
    )
    return EXIT_FAILED


def send(args: argparse.Namespace, config: AidxConfig) -> int:
    from aidx.config import ConfigError, DestinationConfig
    from dicom_node.client import collect_files
    from dicom_node.dicomweb.client import StowError, stow_files
    from dicom_node.export import SendError, send_files

    try:
        destination = _any_destination(config, args.destination)
        files = collect_files(args.paths)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"aidx send: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.queue:
        store = _open_store(config)
        # Absolute paths: `aidx serve` delivers them later, from its own working directory.
        queued = [str(f.resolve()) for f in files]
        key = "send:" + hashlib.sha256("\n".join(queued).encode()).hexdigest()[:32]
        item_id, new = store.enqueue(args.destination, key, queued)
        print(
            f"outbox item {item_id} {'queued' if new else 'was already queued'}: "
            f"{len(files)} files to {args.destination}"
        )
        return EXIT_OK
    if not isinstance(destination, DestinationConfig):
        try:
            sent = stow_files(destination, str(args.destination), files)
        except (StowError, OSError) as exc:
            print(f"aidx send: {exc}", file=sys.stderr)
            return EXIT_FAILED
        print(f"sent {sent} files to {args.destination} by STOW-RS")
        return EXIT_OK
    try:
        report = send_files(destination, config.node.ae_title, files)
    except (SendError, OSError, ValueError, RuntimeError) as exc:
        print(f"aidx send: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(f"sent {report.sent} files to {args.destination} ({report.converted} converted)")
    return EXIT_OK


def _open_store(config: AidxConfig) -> Store:
    from aidx.store.store import Store

    if config.store.url is None:
        # The default SQLite index lives in data_dir, which `aidx serve` creates; `send --queue`
        # may come first.
        config.data_dir.mkdir(parents=True, exist_ok=True)
    return Store.for_config(config)


def outbox_run(args: argparse.Namespace, config: AidxConfig) -> int:
    """`aidx outbox run`: deliver the outbox's items (results, signed SRs, `send --queue`) with
    retries, until SIGTERM or Ctrl-C; woken by the ``results`` doorbell, else it polls every
    ``outbox.poll_interval_s``. One per store: `aidx serve` runs it as a child process."""
    del args
    from sqlalchemy.exc import SQLAlchemyError

    from aidx.cli.signals import stop_on_signals
    from aidx.doorbell import RESULTS, Doorbell
    from aidx.supervisor import lower_priority
    from dicom_node.export import ExportWorker

    lower_priority(config.outbox.nice)  # as under `aidx serve` (it set it already)
    stop = stop_on_signals()
    try:
        store = _open_store(config)
    except (OSError, ValueError, SQLAlchemyError) as exc:
        print(f"aidx outbox run: cannot start: {exc}", file=sys.stderr)
        return EXIT_USAGE
    exporter = ExportWorker(config, store)
    bell = Doorbell(config.data_dir, RESULTS, exporter.notify)
    exporter.start()
    bell.start()
    log.info("aidx outbox: delivering to %s", ", ".join(config.destinations) or "(none)")
    try:
        stop.wait()
    finally:
        bell.stop()
        exporter.stop()
        store.close()
    return EXIT_OK


def outbox_list(args: argparse.Namespace, config: AidxConfig) -> int:
    items = _open_store(config).outbox_items(args.state)
    if not items:
        print("outbox is empty" if args.state is None else f"no {args.state} items")
        return EXIT_OK
    print(
        f"{'ID':>5}  {'DESTINATION':<16} {'STATE':<8} {'TRIES':>5}  {'FILES':>5}  NEXT / LAST ERROR"
    )
    for item in items:
        when = ""
        if item.state == "pending":
            when = "next " + time.strftime("%H:%M:%S", time.localtime(item.next_attempt_at))
        error = f"  {item.last_error}" if item.last_error else ""
        print(
            f"{item.id:>5}  {item.destination:<16} {item.state:<8} {item.attempts:>5}  "
            f"{len(item.files):>5}  {when}{error}"
        )
    return EXIT_OK


def outbox_retry(args: argparse.Namespace, config: AidxConfig) -> int:
    count = _open_store(config).retry(args.ids or None)
    print(f"{count} failed items queued again")
    return EXIT_OK
