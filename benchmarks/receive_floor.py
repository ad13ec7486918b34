"""Benchmark: where the bare pynetdicom SCP's time goes (the floor `benchmarks/ingest.py` uses).

Three variants of the same bare storage SCP (each in its own process, as in ingest.py), timed
with DCMTK storescu sending a 300 x 512² study on one association, in turns, medians over
--repeats, ratios against ``stock`` measured in the same run:

- ``stock``: pynetdicom as shipped (its DUL and association loops sleep 1 ms when idle; PDUs are
  read from the socket 4 KB at a time);
- ``event``: the two idle sleeps replaced by waits that end when data arrives (select on the
  socket and a wake-up pipe; a blocking get on the DIMSE queue): what polling latency costs;
- ``recv``: each PDU read with ``recv_into`` into one buffer instead of 4 KB reads.

It also prints the server process's CPU seconds (user + system, start-up imports included).
The variants patch pynetdicom 3.0's internals in the server process only; aidx does not use
them (neither was faster here: see the README's ingest figures).

Usage: python benchmarks/receive_floor.py [--repeats 4] [--slices 300] [--matrix 512]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import queue
import select
import socket
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

# Run as a script, this folder comes first on sys.path and its training.py would shadow the
# package: the repository goes first instead (as in attack.py).
_HERE = Path(__file__).resolve().parent
REPO = _HERE.parent
sys.path[:] = [str(REPO)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE]

from benchmarks.ingest import Receiver, dcm_count, send, serve_bare
from tests.peers import LOOPBACK, free_port, start_process, stop_process, wait_for_port

VARIANTS = ("stock", "event", "recv")
WAIT_S = 0.05  # the longest an event-driven wait sleeps before looking at its timers


def _patch_event_driven() -> None:
    """Idle waits that end when there is something to do (instead of 1 ms sleeps)."""
    from pynetdicom import association, dul, evt

    provider = dul.DULServiceProvider
    original_init, original_send = provider.__init__, provider.send_pdu

    def init(self: Any, assoc: Any) -> None:
        original_init(self, assoc)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)

    def send_pdu(self: Any, primitive: Any) -> None:
        original_send(self, primitive)
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    def idle(self: Any) -> None:
        sock = getattr(self.socket, "socket", None) if self.socket else None
        watched = [self._wake_r] + ([sock] if sock is not None and sock.fileno() >= 0 else [])
        try:
            ready, _, _ = select.select(watched, [], [], WAIT_S)
        except (OSError, ValueError):
            return
        if self._wake_r in ready:
            with contextlib.suppress(OSError):
                while self._wake_r.recv(4096):
                    pass

    def run_reactor(self: Any) -> None:  # pynetdicom 3.0's loop, with idle() for its sleep
        self._idle_timer.start()
        wait = False
        while True:
            if not self.assoc._dul_ready.is_set():
                self.assoc._dul_ready.set()
                wait = True
            if wait:
                idle(self)
            if self._kill_thread:
                break
            if self.artim_timer.expired:
                self.event_queue.put("Evt18")
            if not self._process_recv_primitive() and self._is_transport_event():
                self._idle_timer.restart()
            try:
                event = self.event_queue.get(block=False)
            except queue.Empty:
                wait = True
                continue
            self.state_machine.do_action(event)
            wait = False

    def association_reactor(self: Any) -> None:  # the acceptor loop, waiting on its queue
        self._is_paused = False
        while not self._kill:
            try:
                context_id, msg = self.dimse.msg_queue.get(timeout=WAIT_S)
            except queue.Empty:
                context_id, msg = None, None
            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False
            if msg:
                self._serve_request(msg, context_id)
            if self.is_established and self.acse.is_release_requested():
                self.acse.send_release(is_response=True)
                self.is_released, self.is_established = True, False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return
            if self.acse.is_aborted():
                self.dul.receive_pdu(wait=False)
                self.is_aborted, self.is_established = True, False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return
            if not self.dul.is_alive() or self.dul.idle_timer_expired():
                self.kill()
                return

    provider.__init__ = init
    provider.send_pdu = send_pdu
    provider.run_reactor = run_reactor
    association.Association._run_reactor = association_reactor


def _patch_one_recv() -> None:
    """Read each PDU with recv_into into one buffer."""
    from pynetdicom import transport

    def recv(self: Any, nr_bytes: int) -> bytearray:
        buffer = bytearray(nr_bytes)
        view, got = memoryview(buffer), 0
        while got < nr_bytes:
            n = self.socket.recv_into(view[got:], nr_bytes - got)
            if not n:
                break
            got += n
        view.release()
        del buffer[got:]
        return buffer

    transport.AssociationSocket.recv = recv


def serve(variant: str, port: int, out_dir: Path) -> None:
    """benchmarks/ingest.py's bare SCP (writes each data set's bytes), patched."""
    if variant == "event":
        _patch_event_driven()
    elif variant == "recv":
        _patch_one_recv()
    serve_bare(port, out_dir)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed(variant: str, study: Path, work: Path) -> tuple[float, float]:
    port, out, log = free_port(), work / variant, work / f"{variant}.log"
    command = [sys.executable, str(Path(__file__).resolve()), "--serve", variant, str(port)]
    process = start_process([*command, str(out)], log)
    try:
        wait_for_port(LOOPBACK, port, 30.0, process=process, log_path=log)
        seconds = send(Receiver("BARE", port, process.pid), [study], work / "logs")
        cpu = cpu_seconds(process.pid)
        if dcm_count(out) != dcm_count(study):
            raise SystemExit(f"{variant}: {dcm_count(out)} files of {dcm_count(study)}")
    finally:
        stop_process(process)
    return seconds, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--matrix", type=int, default=512)
    parser.add_argument("--serve", nargs=3, metavar=("VARIANT", "PORT", "DIR"), help="internal")
    args = parser.parse_args()
    if args.serve:
        serve(args.serve[0], int(args.serve[1]), Path(args.serve[2]))
        return
    from training.phantom import PhantomOptions, generate

    machine = f"{platform.machine()}, {os.cpu_count()} cores"
    print(f"machine: {machine}, Python {platform.python_version()}")
    with tempfile.TemporaryDirectory(prefix="aidx-receive-") as tmp:
        root = Path(tmp)
        options = PhantomOptions(seed=42, slices=args.slices, matrix=args.matrix, nodules=0)
        study = generate(root / "phantom", options).dicom_dir
        print(f"study: {dcm_count(study)} slices of {args.matrix}², DCMTK storescu, TCP_NODELAY=1")
        runs: dict[str, list[tuple[float, float]]] = {v: [] for v in VARIANTS}
        for n in range(args.repeats):  # in turns, so that a noisy moment hits every variant
            for variant in VARIANTS:
                with tempfile.TemporaryDirectory(dir=root) as work:
                    runs[variant].append(timed(variant, study, Path(work)))
                    print(f"  run {n + 1} {variant}: {runs[variant][-1][0]:.2f} s", flush=True)
    base = statistics.median(s for s, _ in runs["stock"])
    for variant in VARIANTS:
        seconds = statistics.median(s for s, _ in runs[variant])
        cpu = statistics.median(c for _, c in runs[variant])
        print(
            f"{variant:6s} median {seconds:.2f} s ({seconds / base:.2f}x stock), "
            f"server CPU {cpu:.2f} s, runs {', '.join(f'{s:.2f}' for s, _ in runs[variant])}"
        )


if __name__ == "__main__":
    main()
