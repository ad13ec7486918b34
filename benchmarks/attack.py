"""Benchmark: `aidx serve` under attack from loopback (bounded in count and time).

1. Slow and idle connections. A phantom study is sent with DCMTK storescu (TCP_NODELAY=1) to a
   fresh `aidx serve`, once with no attack and once while attackers hold connections open:
   ``--slow`` connections that dribble an A-ASSOCIATE-RQ one byte every ``--dribble-s`` seconds
   and ``--idle`` connections that send nothing, spread over ``--addresses`` source addresses
   in 127.0.0.0/8 (Linux routes the whole range to loopback), each reconnecting when the node
   closes it. Each send must end with a Success response for every image and every image in
   the node's spool; the time is reported against the send with no attack in the same run
   (median of ``--repeats``), with the node's refusals by reason read from its log.
2. Memory. The node's peak resident memory (VmHWM, reset through /proc/PID/clear_refs before
   each send) while it is sent a deflate bomb (``--bomb-factor`` times the configured maximum,
   inflated) and an uncompressed data set twice the maximum; goal: the peak's growth below 2x
   ``node.max_dataset_mb``. The status of each is reported (0xA700 expected).

Only loopback addresses are used; every loop is bounded by the send it accompanies and by
``--attack-limit-s``.

Usage: python benchmarks/attack.py [--repeats 3] [--slices 60] [--matrix 256] [--slow 20]
       [--idle 20] [--addresses 10] [--max-dataset-mb 64]
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

# Run as a script, this folder comes first on sys.path and its training.py would shadow the
# `training` package (whatever PYTHONPATH holds): drop it, and put the repository root first.
_HERE = Path(__file__).resolve().parent
REPO = _HERE.parent
sys.path[:] = [str(REPO)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE]

from tests.peers import (
    LOOPBACK,
    echoscu,
    free_port,
    poll_until,
    start_process,
    stop_process,
    storescu_command,
)
from tests.study_copies import copy_with_new_uids

AET = "AIDX"
# The first bytes of an A-ASSOCIATE-RQ (PDU type 1, length 0x000000CE, protocol version 1).
REQUEST_START = bytes([0x01, 0x00, 0x00, 0x00, 0x00, 0xCE, 0x00, 0x01, 0x00, 0x00]) + b"AIDX"


# --- The node -------------------------------------------------------------------------------
@dataclass
class Node:
    port: int
    pid: int
    data: Path
    log: Path


@contextmanager
def aidx_node(work: Path, max_dataset_mb: int) -> Iterator[Node]:
    config = work / "aidx.yaml"
    config.write_text(
        "node:\n"
        f"  max_dataset_mb: {max_dataset_mb}\n"
        "  study_quiet_period_s: 3600\n"  # no inference during the benchmark
        "ui:\n  enabled: false\n"
        "metrics:\n  port: 0\n",
        encoding="utf-8",
    )
    port, log, data = free_port(), work / "aidx.log", work / "aidx-data"
    aidx = Path(sys.executable).parent / "aidx"
    command = [str(aidx), "--config", str(config), "--data-dir", str(data), "serve"]
    process = start_process([*command, "--port", str(port), "--ae-title", AET], log)
    try:
        poll_until(
            lambda: echoscu(LOOPBACK, port, AET, "BENCH").returncode == 0,
            90.0,
            "aidx serve answering C-ECHO",
            process=process,
            log_path=log,
        )
        yield Node(port, node_process(process.pid), data, log)
    finally:
        stop_process(process)


def node_process(supervisor: int) -> int:
    """The pid of the process that receives: `aidx serve` supervises its node as a child
    (``serve --single-process``); measuring the supervisor would find no growth at all."""
    pending, seen = [supervisor], []
    while pending:
        pid = pending.pop()
        seen.append(pid)
        for task in Path(f"/proc/{pid}/task").iterdir():
            pending += [int(c) for c in (task / "children").read_text().split()]
    for pid in seen:
        if b"--single-process" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0"):
            return pid
    raise RuntimeError(f"no node (serve --single-process) among aidx serve's processes {seen}")


def spool_count(node: Node) -> int:
    return sum(1 for _ in (node.data / "spool").glob("*/*/*.dcm"))


def send_study(node: Node, study: Path, logs: Path) -> float:
    """storescu the study; seconds. Raises unless every image got a Success response."""
    images = len(list(study.glob("*.dcm")))
    command = storescu_command(
        LOOPBACK, node.port, [study], called_aet=AET, calling_aet="PACS", extra_args=["-v"]
    )
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    seconds = time.perf_counter() - start
    logs.mkdir(parents=True, exist_ok=True)
    (logs / f"storescu-{time.time_ns()}.log").write_text(result.stdout + result.stderr)
    successes = (result.stdout + result.stderr).count("Received Store Response (Success)")
    if result.returncode != 0 or successes != images:
        raise RuntimeError(
            f"storescu: exit {result.returncode}, {successes} of {images} images stored; "
            f"last lines: {(result.stdout + result.stderr).strip().splitlines()[-3:]}"
        )
    return seconds


# --- The attackers ---------------------------------------------------------------------------
@dataclass
class Attack:
    port: int
    slow: int
    idle: int
    addresses: int
    dribble_s: float
    limit_s: float
    stop: threading.Event = field(default_factory=threading.Event)
    connections: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self) -> list[threading.Thread]:
        threads = []
        for n in range(self.slow + self.idle):
            source = f"127.0.0.{2 + n % self.addresses}"
            kind = "slow" if n < self.slow else "idle"
            thread = threading.Thread(target=self._attacker, args=(source, kind), daemon=True)
            thread.start()
            threads.append(thread)
        return threads

    def _attacker(self, source: str, kind: str) -> None:
        deadline = time.monotonic() + self.limit_s
        while not self.stop.is_set() and time.monotonic() < deadline:
            try:
                sock = socket.create_connection(
                    (LOOPBACK, self.port), timeout=2.0, source_address=(source, 0)
                )
            except OSError:
                self.stop.wait(0.2)  # the attacker's own pacing, not synchronisation
                continue
            with self.lock:
                self.connections[kind] += 1
            with contextlib.closing(sock):
                self._hold(sock, kind, deadline)
            self.stop.wait(0.2)

    def _hold(self, sock: socket.socket, kind: str, deadline: float) -> None:
        sock.settimeout(self.dribble_s)
        sent = 0
        while not self.stop.is_set() and time.monotonic() < deadline:
            try:
                if kind == "slow" and sent < len(REQUEST_START):
                    sock.send(REQUEST_START[sent : sent + 1])
                    sent += 1
                if sock.recv(1) == b"":
                    return  # the node closed it
            except TimeoutError:
                continue
            except OSError:
                return


@contextmanager
def attacking(attack: Attack) -> Iterator[Attack]:
    threads = attack.run()
    try:
        yield attack
    finally:
        attack.stop.set()
        for thread in threads:
            thread.join(timeout=10)


REFUSAL = re.compile(
    r"connection from \S+ (?:refused|closed): (?P<why>no complete association request|"
    r"the oldest of|too many association requests|\d+ connections from this address)"
)


def refusals(log: Path) -> Counter[str]:
    counts: Counter[str] = Counter()
    for match in REFUSAL.finditer(log.read_text(errors="replace")):
        counts[match.group("why")] += 1
    return counts


# --- Memory ----------------------------------------------------------------------------------
def reset_peak(pid: int) -> bool:
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/{pid}/status")


def big_dataset(nbytes: int) -> bytes:
    """An explicit VR little endian CT data set whose pixel data holds ``nbytes`` zeros."""
    from pydicom.dataset import Dataset
    from pydicom.uid import CTImageStorage, generate_uid

    from tests.dicom_node.senders import encode

    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.Modality = "BENCH", "CT"
    side = int((nbytes // 2) ** 0.5)
    ds.Rows = ds.Columns = side
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = bytes(side * side * 2)
    return encode(ds)


def memory_probe(node: Node, work: Path, data: bytes, syntax: str) -> tuple[int | None, int]:
    """Send one data set; (status, peak RSS growth in KiB over the RSS before it)."""
    from tests.dicom_node.senders import Instance, send_raw

    if not reset_peak(node.pid):
        raise RuntimeError(f"cannot reset the peak RSS of {node.pid} (/proc/PID/clear_refs)")
    before = status_kib(node.pid, "VmRSS")
    sop_class, sop_uid = _uids(data, syntax)
    (code,) = send_raw(node.port, [Instance(data, sop_class, sop_uid, syntax)], work)
    return code, status_kib(node.pid, "VmHWM") - before


def _uids(data: bytes, syntax: str) -> tuple[str, str]:
    from io import BytesIO

    from pydicom.filereader import read_dataset

    raw = zlib.decompressobj(-15).decompress(data, 1 << 16) if syntax.endswith(".99") else data
    ds = read_dataset(BytesIO(raw[: 1 << 16]), False, True, stop_when=lambda t, *_: t > 0x00200000)
    return str(ds.SOPClassUID), str(ds.SOPInstanceUID)


# --- Runs ------------------------------------------------------------------------------------
def main() -> None:
    args = parse_args()
    from training.phantom import PhantomOptions, generate

    with tempfile.TemporaryDirectory(prefix="aidx-attack-") as tmp:
        root = Path(tmp)
        generate(
            root / "study",
            PhantomOptions(seed=5, slices=args.slices, matrix=args.matrix, nodules=1, workers=1),
        )
        source = root / "study" / "dicom"
        images = len(list(source.glob("*.dcm")))
        plain: list[float] = []
        attacked: list[float] = []
        seen: Counter[str] = Counter()
        made: Counter[str] = Counter()
        for run in range(args.repeats):
            for label in ("plain", "attacked"):
                study = copy_with_new_uids(source, root / f"copy-{run}-{label}")
                work = root / f"run-{run}-{label}"
                work.mkdir()
                with aidx_node(work, args.max_dataset_mb) as node:
                    if label == "plain":
                        plain.append(send_study(node, study, work / "logs"))
                    else:
                        attack = Attack(
                            node.port,
                            args.slow,
                            args.idle,
                            args.addresses,
                            args.dribble_s,
                            args.attack_limit_s,
                        )
                        with attacking(attack):
                            # Let the attackers take what they can before the PACS connects.
                            poll_until(
                                lambda a=attack: (
                                    sum(a.connections.values()) >= min(args.slow + args.idle, 8)
                                ),
                                30.0,
                                "attackers connected",
                            )
                            attacked.append(send_study(node, study, work / "logs"))
                        made.update(attack.connections)
                        seen.update(refusals(node.log))
                    held = spool_count(node)
                    if held != images:
                        raise RuntimeError(f"{label} run {run}: {held} of {images} images stored")
        memory = run_memory(root, args)
    report(args, images, plain, attacked, seen, made, memory)


def run_memory(root: Path, args: argparse.Namespace) -> list[tuple[str, int | None, int]]:
    maximum = args.max_dataset_mb * 1024 * 1024
    work = root / "memory"
    work.mkdir()
    results = []
    with aidx_node(work, args.max_dataset_mb) as node:
        bomb_plain = big_dataset(maximum * args.bomb_factor)
        packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        bomb = packer.compress(bomb_plain) + packer.flush()
        del bomb_plain
        code, growth = memory_probe(node, work, bomb, "1.2.840.10008.1.2.1.99")
        results.append((f"deflate bomb ({len(bomb) / 1e6:.1f} MB sent)", code, growth))
        del bomb
        oversized = big_dataset(2 * maximum)
        code, growth = memory_probe(node, work, oversized, "1.2.840.10008.1.2.1")
        results.append((f"oversized data set ({len(oversized) / 1e6:.0f} MB sent)", code, growth))
        del oversized
        fits = big_dataset(maximum * 9 // 10)
        code, growth = memory_probe(node, work, fits, "1.2.840.10008.1.2.1")
        results.append((f"data set within the limit ({len(fits) / 1e6:.0f} MB)", code, growth))
        if growth * 1024 < len(fits) // 2:  # it holds the data set at least once
            raise RuntimeError(f"pid {node.pid} grew {growth} KiB: not the receiving process")
    return results


def report(
    args: argparse.Namespace,
    images: int,
    plain: list[float],
    attacked: list[float],
    seen: Counter[str],
    made: Counter[str],
    memory: list[tuple[str, int | None, int]],
) -> None:
    print(f"# attack benchmark on {platform.node()} ({platform.machine()}, {_cpus()} CPUs)")
    print(
        f"study: {images} images {args.matrix}²; attackers: {args.slow} slow (1 byte every "
        f"{args.dribble_s:g} s) + {args.idle} idle connections from {args.addresses} addresses"
    )
    p, a = statistics.median(plain), statistics.median(attacked)
    print(f"send with no attack : median {p:.2f} s over {len(plain)} ({_list(plain)})")
    print(f"send under attack   : median {a:.2f} s over {len(attacked)} ({_list(attacked)})")
    print(f"ratio attacked/plain: {a / p:.2f}  (every image stored in every run)")
    print(f"attacker connections made: {dict(made)}")
    print(f"node refusals logged: {dict(seen)}")
    limit_kib = args.max_dataset_mb * 1024
    print(f"memory (node.max_dataset_mb {args.max_dataset_mb}; goal: peak growth < 2x):")
    for label, code, growth in memory:
        shown = "none" if code is None else f"0x{code:04X}"
        print(f"  {label:40s} status {shown}  peak growth {growth / 1024:7.1f} MiB")
        print(f"  {'':40s} = {growth / limit_kib:.2f}x the maximum")


def _list(values: list[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


def _cpus() -> int:
    import os

    return os.cpu_count() or 0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--slices", type=int, default=60)
    parser.add_argument("--matrix", type=int, default=256)
    parser.add_argument("--slow", type=int, default=20)
    parser.add_argument("--idle", type=int, default=20)
    parser.add_argument("--addresses", type=int, default=10)
    parser.add_argument("--dribble-s", type=float, default=1.0)
    parser.add_argument("--attack-limit-s", type=float, default=300.0)
    parser.add_argument("--max-dataset-mb", type=int, default=64)
    parser.add_argument("--bomb-factor", type=int, default=16)
    return parser.parse_args()


if __name__ == "__main__":
    main()
