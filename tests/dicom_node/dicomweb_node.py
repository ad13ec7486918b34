"""The DICOMweb tests' node and helpers (tests/dicom_node/test_dicomweb_*.py): one node per test
module, with three peers: ``pacs`` (store and read), ``viewer`` (read only) and ``orthanc``."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom.uid import generate_uid

from aidx.cli.pipeline import review_sessions
from aidx.pipeline.worker import Worker
from aidx.store.store import Store
from dicom_node.dicomweb.stow import read_part10
from dicom_node.service import NodeService
from tests.dicom_node.conftest import node_config, wait_for
from tests.peers.process import free_port
from tests.standin_model import install

TOKENS = {"pacs": "pacs-token-0123456789", "viewer": "viewer-token-0123456789"}
ORTHANC_TOKEN = "orthanc-token-0123456789"
BOUNDARY = "aidx-test-boundary"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"


def _sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def dicomweb_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeService]:
    """A node with its DICOMweb service and three peers (a module fixture yields from it)."""
    root = tmp_path_factory.mktemp("dicomweb")
    models = root / "models"
    model = install(models, root)
    config = node_config(
        root / "data",
        dicomweb__port=free_port(),
        dicomweb__max_request_mb=1,
        dicomweb__peers=[
            {"name": "pacs", "token_sha256": _sha(TOKENS["pacs"])},
            {"name": "viewer", "token_sha256": _sha(TOKENS["viewer"]), "store": False},
            {"name": "orthanc", "token_sha256": _sha(ORTHANC_TOKEN), "read": False},
        ],
        models__dir=str(models),
        models__default=model,
        inference__providers=["CPUExecutionProvider"],
        inference__min_volume_mm3=1000,
        inference__series__min_slices=8,
    )
    store = Store.for_config(config)
    # Each test's own outbox delivers (`_outbox`); people read with their review-app session,
    # checked as `aidx serve` wires it.
    service = NodeService(config, store, outbox=False, sessions=review_sessions(config, store))
    service.start()
    yield service
    service.stop()
    service.store.close()


def _url(node: NodeService) -> str:
    assert node.dicomweb is not None
    return node.dicomweb.url


def _auth(peer: str = "pacs") -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[peer]}"}


def _client(node: NodeService, peer: str = "pacs") -> DICOMwebClient:
    return DICOMwebClient(url=_url(node), headers=_auth(peer))


def _multipart(parts: list[bytes], part_type: str = "application/dicom") -> bytes:
    body = b"".join(
        b"\r\n--" + BOUNDARY.encode() + f"\r\nContent-Type: {part_type}\r\n\r\n".encode() + p
        for p in parts
    )
    return body + b"\r\n--" + BOUNDARY.encode() + b"--\r\n"


DICOM_PARTS = 'multipart/related; type="application/dicom"'
STOW_TYPE = f"{DICOM_PARTS}; boundary={BOUNDARY}"


def _stow(
    node: NodeService, parts: list[bytes], path: str = "/studies", **headers: str
) -> httpx.Response:
    return httpx.post(
        _url(node) + path,
        content=_multipart(parts),
        headers={"Content-Type": STOW_TYPE, **_auth(), **headers},
        timeout=60,
    )


def _copy(files: list[Path], out: Path) -> list[Path]:
    """The study again under new study, series and instance UIDs (a study not yet stored)."""
    out.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    copies = []
    for path in files:
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        copies.append(out / path.name)
        ds.save_as(copies[-1], enforce_file_format=True)
    return copies


def _files(small_study: Path) -> list[Path]:
    return sorted(small_study.glob("*.dcm"))


def _dataset_bytes(data: bytes) -> bytes:
    return data[read_part10(memoryview(data)).dataset_offset :]


def _count(node: NodeService, study_uid: str) -> int:
    return len(node.store.study_instances(study_uid))


def analysed_study(node: NodeService, small_study: Path) -> str:
    """The small study, stored by STOW-RS, assembled and analysed (AI SR and SEG)."""
    files = _files(small_study)
    uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    if _count(node, uid) < len(files):
        assert _stow(node, [f.read_bytes() for f in files]).status_code == 200
    wait_for(lambda: len(node.store.study_jobs(uid)) >= 1, "the study's job")
    assert Worker(node.config, node.store).run_once()
    (result,) = node.store.study_results(uid)
    assert result["seg_path"] is not None
    return uid
