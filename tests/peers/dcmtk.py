"""DCMTK peers: the storescu and echoscu clients and the storescp storage SCP.

DCMTK programs are called by absolute path because pynetdicom installs its own
``storescu``/``echoscu`` into the virtual environment, which would shadow them on PATH.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Self

from tests.peers.process import (
    LOOPBACK,
    Modality,
    PeerError,
    _Server,
    free_port,
    peer_env,
    poll_until,
    tool,
    wait_for_port,
)

STORESCU = "/usr/bin/storescu"
ECHOSCU = "/usr/bin/echoscu"
STORESCP = "/usr/bin/storescp"
DCMTK_PACKAGE = "dcmtk"
# DCMTK's largest receive PDU; its default (16 384 bytes) makes a 512² slice take 32 PDUs.
DCMTK_MAX_PDU = 131072


# --- DCMTK clients -------------------------------------------------------------------------------


def storescu_command(
    host: str,
    port: int,
    paths: Iterable[Path | str],
    *,
    called_aet: str = "ANY-SCP",
    calling_aet: str = "STORESCU",
    extra_args: Sequence[str] = (),
) -> list[str]:
    """The DCMTK storescu command line sending files and directories (only ``*.dcm`` in those)
    in one association; for callers that run several senders at once with `subprocess.Popen`."""
    items = [Path(p) for p in paths]
    if not items:
        raise ValueError("storescu needs at least one file or directory to send")
    command = [tool(STORESCU, DCMTK_PACKAGE), "-aet", calling_aet, "-aec", called_aet]
    if any(item.is_dir() for item in items):
        # +sd alone also tries every non-DICOM file in the folder.
        command += ["+sd", "+sp", "*.dcm"]
    command += [*extra_args, host, str(port), *(str(item) for item in items)]
    return command


def _run_tool(
    command: list[str], timeout: float, check: bool, what: str
) -> subprocess.CompletedProcess[str]:
    try:
        result = subprocess.run(
            command,
            check=False,
            capture_output=True,
            text=True,
            env=peer_env(),
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as exc:  # subprocess.run has killed the tool already
        raise PeerError(
            f"{what} did not finish within {timeout:.0f} s: {' '.join(command)}"
        ) from exc
    if check and result.returncode != 0:
        output = (result.stdout + result.stderr).strip().splitlines()[-20:]
        raise PeerError(
            f"{what} failed with exit code {result.returncode}: {' '.join(command)}\n"
            + "\n".join(output)
        )
    return result


def storescu(
    host: str,
    port: int,
    paths_or_dirs: Iterable[Path | str],
    *,
    called_aet: str = "ANY-SCP",
    calling_aet: str = "STORESCU",
    extra_args: Sequence[str] = (),
    timeout: float = 300.0,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Send DICOM files (directories: their ``*.dcm`` files) with DCMTK storescu, one association.

    storescu stops at the first refused C-STORE and exits non-zero; with ``check`` that raises
    `PeerError` with its output.
    """
    command = storescu_command(
        host,
        port,
        paths_or_dirs,
        called_aet=called_aet,
        calling_aet=calling_aet,
        extra_args=extra_args,
    )
    return _run_tool(command, timeout, check, "storescu")


def echoscu(
    host: str,
    port: int,
    called_aet: str = "ANY-SCP",
    calling_aet: str = "ECHOSCU",
    *,
    timeout: float = 30.0,
    check: bool = False,
) -> subprocess.CompletedProcess[str]:
    """A C-ECHO (verification, PS3.4 Annex A) with DCMTK echoscu; exit code 0 means success."""
    command = [
        tool(ECHOSCU, DCMTK_PACKAGE),
        "-aet",
        calling_aet,
        "-aec",
        called_aet,
        host,
        str(port),
    ]
    return _run_tool(command, timeout, check, "echoscu")


# --- Storage SCP ---------------------------------------------------------------------------------


class Storescp(_Server):
    """DCMTK storescp (storage SCP, PS3.4 Annex B) writing every received object to ``out_dir``.

    Single-process by default, so it serves associations one after another and keeps running;
    ``fork=True`` forks a child per association (for concurrent senders). Files get unique names
    (``+uf``), so a re-sent instance adds a file instead of overwriting one. It accepts every
    transfer syntax it knows (``+xa``) and unknown SOP classes (``-pm``), and skips reverse DNS
    lookups (``-dhl``), which stall without a network. ``extra_args`` come after these, and the
    last option of a group wins in DCMTK: ``("+xe",)`` accepts only uncompressed transfer
    syntaxes, ``("+B",)`` writes each data set bit for bit as received.
    """

    name = "storescp"

    def __init__(
        self,
        out_dir: Path,
        *,
        aet: str = "STORESCP",
        port: int | None = None,
        fork: bool = False,
        max_pdu: int = DCMTK_MAX_PDU,
        extra_args: Sequence[str] = (),
        log_path: Path | None = None,
        start_timeout_s: float = 15.0,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        # The log lives beside the output folder, so that files() sees only received objects.
        super().__init__(log_path or self.out_dir.parent / f"storescp-{self.out_dir.name}.log")
        self._aet = aet
        self._port = port or free_port()
        self._fork = fork
        self._max_pdu = max_pdu
        self._extra_args = tuple(extra_args)
        self._start_timeout_s = start_timeout_s

    @property
    def aet(self) -> str:
        return self._aet

    @property
    def port(self) -> int:
        return self._port

    def modality(self) -> Modality:
        """This peer as an Orthanc DicomModalities entry."""
        return (self._aet, LOOPBACK, self._port)

    def start(self) -> Self:
        command = [
            tool(STORESCP, DCMTK_PACKAGE),
            "--fork" if self._fork else "--single-process",
            "-aet",
            self._aet,
            "-od",
            str(self.out_dir),
            "+uf",
            "-fe",
            ".dcm",
            "+xa",
            "-pm",
            "-dhl",
            "-pdu",
            str(self._max_pdu),
            *self._extra_args,
            str(self._port),
        ]
        process = self._launch(command)
        wait_for_port(
            LOOPBACK, self._port, self._start_timeout_s, process=process, log_path=self.log_path
        )
        return self

    def files(self) -> list[Path]:
        """The files received so far, sorted by name."""
        return sorted(p for p in self.out_dir.iterdir() if p.is_file())

    def wait_for_files(self, count: int, deadline_s: float = 30.0) -> list[Path]:
        """Wait until at least ``count`` files have arrived; return them."""
        poll_until(
            lambda: len(self.files()) >= count,
            deadline_s,
            f"storescp on port {self._port} waiting for {count} files (has {len(self.files())})",
            process=self._process,
            log_path=self.log_path,
        )
        return self.files()
