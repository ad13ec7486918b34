"""The DICOM test peers themselves (tests/peers/), against the real DCMTK and Orthanc programs.

Other tests and the ingest benchmark trust these helpers to start, reach and stop real peers;
here each path is checked by what actually arrived at the other end (files, Orthanc instances,
SOP Instance UIDs), not by exit codes alone.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from tests.conftest import require_tool
from tests.peers import (
    LOOPBACK,
    Orthanc,
    PeerError,
    Storescp,
    ToolMissingError,
    echoscu,
    free_port,
    rss_kib,
    start_process,
    stop_process,
    storescu,
    tool,
    wait_for_port,
)
from training.phantom import PhantomOptions, generate

pytestmark = pytest.mark.external

SLICES = 12


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small phantom CT series; returns the folder of its ``*.dcm`` files."""
    root = tmp_path_factory.mktemp("phantom")
    generate(root / "s", PhantomOptions(seed=1, slices=SLICES, matrix=128, nodules=0, workers=1))
    return root / "s" / "dicom"


def sop_uids(paths: list[Path]) -> set[str]:
    return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}


def study_uid(series: Path) -> str:
    first = sorted(series.glob("*.dcm"))[0]
    return str(pydicom.dcmread(first, stop_before_pixels=True).StudyInstanceUID)


@pytest.fixture
def dcmtk() -> None:
    for name in ("storescu", "echoscu", "storescp"):
        require_tool(name, "dcmtk")


@pytest.fixture
def orthanc_tool() -> None:
    require_tool("Orthanc", "orthanc")


def test_a_missing_program_names_the_debian_package_to_install(tmp_path: Path) -> None:
    with pytest.raises(ToolMissingError, match="install the Debian package 'dcmtk'"):
        tool(str(tmp_path / "storescu"), "dcmtk")


def test_wait_for_port_fails_fast_with_the_log_tail_when_the_peer_dies(tmp_path: Path) -> None:
    log = tmp_path / "peer.log"
    process = start_process(["sh", "-c", "echo cannot bind port; exit 3"], log)
    try:
        with pytest.raises(PeerError, match="exited with code 3") as info:
            wait_for_port(LOOPBACK, free_port(), 10.0, process=process, log_path=log)
    finally:
        stop_process(process)
    assert "cannot bind port" in str(info.value)


def test_wait_for_port_times_out_with_the_log_tail(tmp_path: Path) -> None:
    log = tmp_path / "peer.log"
    process = start_process(["sh", "-c", "echo still starting; exec sleep 30"], log)
    try:
        with pytest.raises(PeerError, match="not ready after") as info:
            wait_for_port(LOOPBACK, free_port(), 0.3, process=process, log_path=log)
    finally:
        stop_process(process)
    assert "still starting" in str(info.value)
    assert process.poll() is not None, "stop_process left the peer running"


def test_rss_kib_reads_this_process_and_refuses_a_dead_one() -> None:
    assert rss_kib(os.getpid()) > 1000
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    with pytest.raises(PeerError, match="is gone"):
        rss_kib(int(done.stdout))


@pytest.mark.usefixtures("dcmtk", "orthanc_tool")
def test_echoscu_reaches_orthanc_and_fails_on_a_closed_port(tmp_path: Path) -> None:
    with Orthanc(tmp_path / "orthanc", aet="ORTHANC_T") as orthanc:
        answered = echoscu(LOOPBACK, orthanc.dicom_port, orthanc.aet, "ECHO_T")
        assert answered.returncode == 0, answered.stderr
        nobody = echoscu(LOOPBACK, free_port(), "NOBODY", "ECHO_T", timeout=10.0)
        assert nobody.returncode != 0
        process = orthanc.process
    assert process.poll() is not None, "Orthanc still runs after its with block"


@pytest.mark.usefixtures("dcmtk")
def test_storescu_series_arrives_at_storescp(tmp_path: Path, series: Path) -> None:
    with Storescp(tmp_path / "received", aet="SCP_T") as scp:
        storescu(LOOPBACK, scp.port, [series], called_aet=scp.aet)
        # A second association to the same single-process storescp: it keeps serving, and
        # unique file names keep both copies.
        storescu(LOOPBACK, scp.port, [series], called_aet=scp.aet)
        files = scp.files()
        process = scp.process
    assert process.poll() is not None, "storescp still runs after its with block"
    assert len(files) == 2 * SLICES
    assert all(f.suffix == ".dcm" for f in files)
    assert sop_uids(files) == sop_uids(sorted(series.glob("*.dcm")))


@pytest.mark.usefixtures("dcmtk", "orthanc_tool")
def test_storescu_series_is_stored_by_orthanc(tmp_path: Path, series: Path) -> None:
    with Orthanc(tmp_path / "orthanc") as orthanc:
        storescu(LOOPBACK, orthanc.dicom_port, [series], called_aet=orthanc.aet)
        assert len(orthanc.instances()) == SLICES
        study = orthanc.find_study(study_uid(series))
        assert study is not None
        assert orthanc.studies() == [study]
        assert orthanc.study_instance_count(study) == SLICES
        stored = {orthanc.instance_tags(i)["SOPInstanceUID"] for i in orthanc.instances()}
        assert stored == sop_uids(sorted(series.glob("*.dcm")))
        assert orthanc.find_study("1.2.826.0.1.3680043.2.1125.1") is None
        orthanc.clear()
        assert orthanc.instances() == []


@pytest.mark.usefixtures("dcmtk", "orthanc_tool")
def test_orthanc_pushes_a_study_to_storescp(tmp_path: Path, series: Path) -> None:
    with (
        Storescp(tmp_path / "pushed", aet="PUSH_T") as scp,
        Orthanc(tmp_path / "orthanc", modalities={"scp": scp.modality()}) as orthanc,
    ):
        ids = orthanc.upload_dir(series)
        assert len(set(ids)) == SLICES
        assert orthanc.echo("scp")
        study = orthanc.find_study(study_uid(series))
        assert study is not None
        job = orthanc.push_study(study, "scp")
        assert job["InstancesCount"] == SLICES
        assert job["FailedInstancesCount"] == 0
        files = scp.wait_for_files(SLICES)
        assert len(files) == SLICES
        assert sop_uids(files) == sop_uids(sorted(series.glob("*.dcm")))
        # A destination that does not answer is reported as such, not as an exception.
        orthanc.add_modality("gone", ("GONE", LOOPBACK, free_port()))
        assert not orthanc.echo("gone")
