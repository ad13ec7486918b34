"""Orthanc as a test peer: its own configuration, storage and index, reached over REST."""

from __future__ import annotations

import json
import shutil
import tempfile
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Self

from tests.peers.process import (
    _OPENER,
    LOOPBACK,
    Modality,
    PeerError,
    ToolMissingError,
    _failure,
    _Server,
    free_port,
    tool,
    wait_for_http,
)

ORTHANC = "/usr/sbin/Orthanc"
ORTHANC_PACKAGE = "orthanc"
ORTHANC_DICOMWEB = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
ORTHANC_DICOMWEB_PACKAGE = "orthanc-dicomweb"


def dicomweb_plugin(servers: Mapping[str, tuple[str, Mapping[str, str]]]) -> dict[str, Any]:
    """Orthanc configuration keys that load Debian's DICOMweb plugin (served under
    ``/dicom-web/``) and declare ``servers`` (name -> (base URL, HTTP headers such as
    Authorization)) as its DicomWeb.Servers; raises ToolMissingError without the plugin."""
    if not Path(ORTHANC_DICOMWEB).is_file():
        raise ToolMissingError(
            f"{ORTHANC_DICOMWEB} not found: install the Debian package "
            f"'{ORTHANC_DICOMWEB_PACKAGE}' (sudo apt-get install {ORTHANC_DICOMWEB_PACKAGE}, "
            "or `make system-deps` as root)"
        )
    return {
        "Plugins": [ORTHANC_DICOMWEB],
        "DicomWeb": {
            "Enable": True,
            "Root": "/dicom-web/",
            "Servers": {
                name: {"Url": url, "HttpHeaders": dict(headers)}
                for name, (url, headers) in servers.items()
            },
        },
    }


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

    def stow(self, server: str, resources: list[str]) -> Any:
        """Send resources (Orthanc IDs) to a DicomWeb.Servers entry by STOW-RS and wait."""
        return self.post(f"/dicom-web/servers/{server}/stow", {"Resources": resources})

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
