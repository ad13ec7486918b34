"""Real DICOM peers on loopback for tests and benchmarks: Orthanc, DCMTK storescp/storescu/echoscu.

These are plain typed helpers, not pytest fixtures, so that benchmarks can use them too. Every
peer is a context manager that stops its process (and the process group it leads) on exit, and
every wait is a bounded poll on a condition with a deadline; a timeout raises `PeerError` with
the tail of the peer's log, which is usually where the reason is.

DCMTK tools and Orthanc (which embeds DCMTK) run with ``TCP_NODELAY=1``: without it every
C-STORE waits about 40 ms on loopback (Nagle + delayed ACK). DCMTK programs are called by
absolute path because pynetdicom installs its own ``storescu``/``echoscu`` into the virtual
environment, which would shadow them on PATH.

The modules, by responsibility: `tests.peers.process` (errors, tool lookup, ports, polling,
starting and stopping processes, memory use, the server base class), `tests.peers.dcmtk`
(storescu, echoscu, storescp) and `tests.peers.orthanc` (Orthanc and its REST API). Everything
public is importable from `tests.peers` itself, except `tests.peers.fhir` (a small FHIR R4
server in the test's process, the EMR's endpoint), imported from its module: it loads
fhir.resources.
"""

from tests.peers.dcmtk import (
    DCMTK_MAX_PDU,
    DCMTK_PACKAGE,
    ECHOSCU,
    STORESCP,
    STORESCU,
    Storescp,
    echoscu,
    storescu,
    storescu_command,
)
from tests.peers.orthanc import ORTHANC, ORTHANC_PACKAGE, Orthanc
from tests.peers.process import (
    LOOPBACK,
    POLL_INTERVAL_S,
    STOP_TIMEOUT_S,
    Modality,
    PeerError,
    ToolMissingError,
    descendants,
    free_port,
    http_ready,
    log_tail,
    peer_env,
    poll_until,
    port_open,
    rss_kib,
    rss_tree_kib,
    start_process,
    stop_process,
    tool,
    wait_for_http,
    wait_for_port,
)

__all__ = [
    "DCMTK_MAX_PDU",
    "DCMTK_PACKAGE",
    "ECHOSCU",
    "LOOPBACK",
    "ORTHANC",
    "ORTHANC_PACKAGE",
    "POLL_INTERVAL_S",
    "STOP_TIMEOUT_S",
    "STORESCP",
    "STORESCU",
    "Modality",
    "Orthanc",
    "PeerError",
    "Storescp",
    "ToolMissingError",
    "descendants",
    "echoscu",
    "free_port",
    "http_ready",
    "log_tail",
    "peer_env",
    "poll_until",
    "port_open",
    "rss_kib",
    "rss_tree_kib",
    "start_process",
    "stop_process",
    "storescu",
    "storescu_command",
    "tool",
    "wait_for_http",
    "wait_for_port",
]
