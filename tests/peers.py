"""Real DICOM peers on loopback for tests and benchmarks: Orthanc, DCMTK storescp/storescu/echoscu.

These are plain typed helpers, not pytest fixtures, so that benchmarks can use them too. Every
peer is a context manager that stops its process (and the process group it leads) on exit, and
every wait is a bounded poll on a condition with a deadline; a timeout raises `PeerError` with
the tail of the peer's log, which is usually where the reason is.

DCMTK tools and Orthanc (which embeds DCMTK) run with ``TCP_NODELAY=1``: without it every
C-STORE waits about 40 ms on loopback (Nagle + delayed ACK). DCMTK programs are called by
absolute path because pynetdicom installs its own ``storescu``/``echoscu`` into the virtual
environment, which would shadow them on PATH.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

LOOPBACK = "127.0.0.1"
STORESCU = "/usr/bin/storescu"
ECHOSCU = "/usr/bin/echoscu"
STORESCP = "/usr/bin/storescp"
ORTHANC = "/usr/sbin/Orthanc"
DCMTK_PACKAGE = "dcmtk"
ORTHANC_PACKAGE = "orthanc"
POLL_INTERVAL_S = 0.05
STOP_TIMEOUT_S = 10.0
# DCMTK's largest receive PDU; its default (16 384 bytes) makes a 512² slice take 32 PDUs.
DCMTK_MAX_PDU = 131072

Modality = tuple[str, str, int]
"""An Orthanc DicomModalities entry: (AE title, host, port)."""


class PeerError(RuntimeError):
    """A DICOM peer could not be started, did not answer, or failed a request."""


class ToolMissingError(PeerError):
    """An external program is not installed."""


def tool(path: str, package: str) -> str:
    """Return ``path`` if it is an executable, else raise naming the Debian package to install."""
    if os.access(path, os.X_OK):
        return path
    raise ToolMissingError(
        f"{path} not found: install the Debian package '{package}'"
        f" (sudo apt-get install {package}, or `make system-deps` as root)"
    )


def peer_env() -> dict[str, str]:
    """The environment for DCMTK tools and Orthanc: ours plus ``TCP_NODELAY=1``."""
    return {**os.environ, "TCP_NODELAY": "1"}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def log_tail(path: Path | None, lines: int = 40) -> str:
    """The last ``lines`` lines of a log file, for error messages ("" if there is none)."""
    if path is None or not path.is_file():
        return ""
    text = path.read_text(encoding="utf-8", errors="replace").splitlines()
    return "\n".join(text[-lines:])


def _failure(message: str, log_path: Path | None) -> PeerError:
    tail = log_tail(log_path)
    where = f"\n--- last lines of {log_path} ---\n{tail}" if tail else ""
    return PeerError(message + where)


def poll_until(
    condition: Callable[[], bool],
    deadline_s: float,
    what: str,
    *,
    process: subprocess.Popen[bytes] | None = None,
    log_path: Path | None = None,
) -> None:
    """Call ``condition`` every few milliseconds until it is true, for at most ``deadline_s``.

    Fails early if ``process`` exits meanwhile (a peer that died will never become ready), and
    puts the log tail into the error either way.
    """
    end = time.monotonic() + deadline_s
    while True:
        if condition():
            return
        if process is not None and process.poll() is not None:
            raise _failure(
                f"{what}: the process exited with code {process.returncode} before it was ready",
                log_path,
            )
        if time.monotonic() >= end:
            raise _failure(f"{what}: not ready after {deadline_s:.0f} s", log_path)
        time.sleep(POLL_INTERVAL_S)


def port_open(host: str, port: int) -> bool:
    """Whether a TCP connection to host:port is accepted right now."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_for_port(
    host: str,
    port: int,
    deadline_s: float,
    *,
    process: subprocess.Popen[bytes] | None = None,
    log_path: Path | None = None,
) -> None:
    """Wait at most ``deadline_s`` seconds until host:port accepts TCP connections."""
    poll_until(
        lambda: port_open(host, port),
        deadline_s,
        f"waiting for {host}:{port}",
        process=process,
        log_path=log_path,
    )


def http_ready(url: str) -> bool:
    """Whether a GET of ``url`` answers 200 right now."""
    try:
        with _OPENER.open(url, timeout=2.0) as response:
            return int(response.status) == 200
    except (urllib.error.URLError, OSError):
        return False


def wait_for_http(
    url: str,
    deadline_s: float,
    *,
    process: subprocess.Popen[bytes] | None = None,
    log_path: Path | None = None,
) -> None:
    """Wait at most ``deadline_s`` seconds until a GET of ``url`` answers 200 (REST readiness)."""
    poll_until(
        lambda: http_ready(url),
        deadline_s,
        f"waiting for {url}",
        process=process,
        log_path=log_path,
    )


# Loopback only: never route our requests through a proxy from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def stop_process(process: subprocess.Popen[bytes], timeout_s: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM the process group ``process`` leads, wait, SIGKILL it if it does not exit."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout_s)
    # Children of a forking server (storescp --fork) may outlive the leader: end them too.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)


def start_process(command: Sequence[str], log_path: Path) -> subprocess.Popen[bytes]:
    """Start ``command`` in its own process group with ``TCP_NODELAY=1``, output to ``log_path``.

    Its own group, so that `stop_process` can end it with any children it forks.
    """
    with log_path.open("ab") as log:
        return subprocess.Popen(
            list(command),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=peer_env(),
            start_new_session=True,
        )


def rss_kib(pid: int) -> int:
    """Resident memory of a process in KiB (VmRSS from /proc/PID/status)."""
    status = Path(f"/proc/{pid}/status")
    try:
        text = status.read_text(encoding="ascii", errors="replace")
    except FileNotFoundError as exc:
        raise PeerError(f"process {pid} is gone: cannot read its memory use") from exc
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise PeerError(f"{status} has no VmRSS line (a zombie or a kernel thread?)")


def descendants(pid: int) -> list[int]:
    """Process ids of all children of ``pid``, recursively (from /proc/PID/task/*/children)."""
    found: list[int] = []
    stack = [pid]
    while stack:
        current = stack.pop()
        for children in Path(f"/proc/{current}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                for child in children.read_text(encoding="ascii").split():
                    found.append(int(child))
                    stack.append(int(child))
    return found


def rss_tree_kib(pid: int) -> int:
    """Resident memory of a process and all its descendants in KiB (shared pages count twice)."""
    total = rss_kib(pid)
    for child in descendants(pid):
        with contextlib.suppress(PeerError):
            total += rss_kib(child)
    return total


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


# --- Servers -------------------------------------------------------------------------------------


class _Server:
    """A server process with a log file, stopped on context exit."""

    name = "server"

    def __init__(self, log_path: Path) -> None:
        self._log_path = log_path
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self._log_path

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def process(self) -> subprocess.Popen[bytes]:
        if self._process is None:
            raise PeerError(f"{self.name} is not running: call start() or use it in a with block")
        return self._process

    def _launch(self, command: Sequence[str]) -> subprocess.Popen[bytes]:
        if self._process is not None:
            raise PeerError(f"{self.name} is already running (pid {self._process.pid})")
        self._process = start_process(command, self._log_path)
        return self._process

    def stop(self) -> None:
        """Terminate the server (SIGTERM, then SIGKILL after a timeout); safe to call twice."""
        if self._process is not None:
            stop_process(self._process)
            self._process = None

    def start(self) -> Self:
        raise NotImplementedError

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


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


class Orthanc(_Server):
    """An Orthanc server with its own configuration, storage and index in a work directory.

    The configuration accepts C-ECHO and C-STORE from any AE, does not check the called AE
    title, accepts unknown SOP classes, and knows the ``modalities`` given here (name ->
    (AE title, host, port)) as C-STORE destinations. HTTP and DICOM ports are free ones on
    loopback (``dicom_port`` chooses the DICOM one, e.g. a port a client was configured with
    before Orthanc starts); the REST API is reached with urllib only. ``config`` overrides or
    adds keys.
    """

    name = "Orthanc"

    def __init__(
        self,
        work_dir: Path | None = None,
        *,
        aet: str = "ORTHANC",
        modalities: Mapping[str, Modality] | None = None,
        config: Mapping[str, Any] | None = None,
        dicom_port: int | None = None,
        start_timeout_s: float = 60.0,
    ) -> None:
        self._own_dir = work_dir is None
        root = Path(tempfile.mkdtemp(prefix="orthanc-")) if work_dir is None else Path(work_dir)
        root.mkdir(parents=True, exist_ok=True)
        super().__init__(root / "orthanc.log")
        self.work_dir = root
        self._aet = aet
        self._dicom_port = dicom_port or free_port()
        self._http_port = free_port()
        self._start_timeout_s = start_timeout_s
        self._config: dict[str, Any] = {
            "Name": f"aidx-test-{self._dicom_port}",
            "DicomAet": aet,
            "DicomPort": self._dicom_port,
            "HttpPort": self._http_port,
            "StorageDirectory": str(root / "storage"),
            "IndexDirectory": str(root / "index"),
            "DicomModalities": {k: list(v) for k, v in (modalities or {}).items()},
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "UnknownSopClassAccepted": True,
            "StableAge": 1,
            # Close an SCU association right after a push, so a single-process storescp is free
            # for the next sender (Orthanc's default keeps it open 5 s).
            "DicomAssociationCloseDelay": 0,
            "SaveJobs": False,
            "Plugins": [],
            "LuaScripts": [],
            **(config or {}),
        }
        self.config_path = root / "orthanc.json"

    @property
    def aet(self) -> str:
        return self._aet

    @property
    def dicom_port(self) -> int:
        return self._dicom_port

    @property
    def http_port(self) -> int:
        return self._http_port

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self._http_port}"

    def start(self) -> Self:
        executable = tool(ORTHANC, ORTHANC_PACKAGE)
        self.config_path.write_text(json.dumps(self._config, indent=2) + "\n", encoding="utf-8")
        process = self._launch([executable, str(self.config_path)])
        wait_for_http(
            f"{self.url}/system", self._start_timeout_s, process=process, log_path=self.log_path
        )
        return self

    def stop(self) -> None:
        """Terminate Orthanc; remove its work directory if this object created it."""
        super().stop()
        if self._own_dir:
            shutil.rmtree(self.work_dir, ignore_errors=True)

    # REST API ------------------------------------------------------------------------------------

    def request(
        self, method: str, path: str, body: bytes | None = None, timeout: float = 60.0
    ) -> Any:
        """One REST call; returns the decoded JSON answer (None for an empty one).

        Raises `PeerError` with Orthanc's error description on any HTTP error.
        """
        request = urllib.request.Request(f"{self.url}{path}", data=body, method=method)
        try:
            with _OPENER.open(request, timeout=timeout) as response:
                payload: bytes = response.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode("utf-8", errors="replace")[:1000]
            raise _failure(
                f"Orthanc {method} {path} answered HTTP {exc.code}: {detail}", self.log_path
            ) from exc
        except (urllib.error.URLError, OSError) as exc:
            raise _failure(f"Orthanc {method} {path} failed: {exc}", self.log_path) from exc
        return json.loads(payload) if payload.strip() else None

    def get(self, path: str) -> Any:
        """GET a REST path such as ``/system`` or ``/studies/{id}``."""
        return self.request("GET", path)

    def post(
        self, path: str, body: bytes | str | Mapping[str, Any] | list[Any] | None = None
    ) -> Any:
        """POST raw bytes, text, or a JSON object/list to a REST path."""
        if isinstance(body, Mapping | list):
            data: bytes = json.dumps(body).encode("utf-8")
        elif isinstance(body, str):
            data = body.encode("utf-8")
        else:
            data = body if body is not None else b""
        return self.request("POST", path, data, timeout=600.0)

    def delete(self, path: str) -> Any:
        """DELETE a REST resource such as ``/patients/{id}``."""
        return self.request("DELETE", path)

    def upload(self, path: Path) -> str:
        """Store one DICOM file through REST (POST /instances); returns its Orthanc instance ID."""
        answer = self.post("/instances", Path(path).read_bytes())
        if not isinstance(answer, dict) or "ID" not in answer:
            raise PeerError(f"Orthanc did not store {path}: it answered {answer!r}")
        return str(answer["ID"])

    def upload_dir(self, directory: Path) -> list[str]:
        """Store every ``*.dcm`` file under ``directory``; returns instance IDs in file order."""
        files = sorted(Path(directory).rglob("*.dcm"))
        if not files:
            raise PeerError(f"no *.dcm files under {directory}")
        return [self.upload(f) for f in files]

    def instances(self) -> list[str]:
        """Orthanc IDs of all stored instances."""
        return [str(i) for i in self.get("/instances")]

    def studies(self) -> list[str]:
        """Orthanc IDs of all stored studies."""
        return [str(s) for s in self.get("/studies")]

    def study_instance_count(self, study_id: str) -> int:
        """How many instances the study with this Orthanc ID holds."""
        return len(self.get(f"/studies/{study_id}/instances"))

    def find_study(self, study_instance_uid: str) -> str | None:
        """The Orthanc ID of the study with this Study Instance UID, or None if it is absent."""
        for match in self.post("/tools/lookup", study_instance_uid) or []:
            if match.get("Type") == "Study":
                return str(match["ID"])
        return None

    def push_study(self, orthanc_study_id: str, modality_name: str) -> dict[str, Any]:
        """C-STORE a study to a configured modality and wait until done.

        Returns Orthanc's job summary (``InstancesCount``, ``FailedInstancesCount``, ...).
        """
        answer = self.post(
            f"/modalities/{modality_name}/store",
            {"Resources": [orthanc_study_id], "Synchronous": True},
        )
        if not isinstance(answer, dict):
            raise PeerError(f"Orthanc push to {modality_name} answered {answer!r}")
        return answer

    def echo(self, modality_name: str) -> bool:
        """C-ECHO a configured modality; False if the association or the echo failed.

        An unknown modality name still raises: that is a mistake in the test, not a result.
        """
        if modality_name not in self.get("/modalities"):
            raise PeerError(f"Orthanc has no modality {modality_name!r}; pass it in `modalities=`")
        try:
            self.post(f"/modalities/{modality_name}/echo", {})
        except PeerError:
            return False
        return True

    def add_modality(self, name: str, modality: Modality) -> None:
        """Declare (or replace) a C-STORE destination at run time (PUT /modalities/{name})."""
        aet, host, port = modality
        data = json.dumps({"AET": aet, "Host": host, "Port": port}).encode("utf-8")
        self.request("PUT", f"/modalities/{name}", data)

    def instance_tags(self, instance_id: str) -> dict[str, Any]:
        """The instance's main tags by keyword (``/instances/{id}/simplified-tags``)."""
        tags = self.get(f"/instances/{instance_id}/simplified-tags")
        if not isinstance(tags, dict):
            raise PeerError(f"Orthanc returned no tags for instance {instance_id}")
        return tags

    def clear(self) -> None:
        """Delete every patient, and with them all studies, series and instances."""
        for patient in self.get("/patients"):
            self.delete(f"/patients/{patient}")
