"""Benchmark: STOW-RS ingest against DIMSE C-STORE into the same aidx node, in the same run.

One node (``aidx serve --single-process --workers 0 --no-ui``: what the supervised node child
runs, with its DICOMweb service on) receives fresh copies of one study (new UIDs each time, so
that none is a re-send), alternately:

- dimse: DCMTK storescu, one association (TCP_NODELAY=1), timed from start to exit, every image
  answered with Success;
- stow: one STOW-RS request with every instance (httpx; the body is built before the clock
  starts, as storescu's files are in the page cache), timed until the response, which must list
  every instance as stored.

Medians over --repeats, and the ratio stow / dimse (goal, issue 20: at most 1.5).

Usage: python benchmarks/stow.py --study DIR [--repeats 3]   (DIR: a folder of *.dcm, e.g. the
       300 x 512² demo study that `aidx demo` writes); without --study a phantom is generated
       (--slices 300 --matrix 512).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: make tests.peers and benchmarks importable
    sys.path.insert(0, str(REPO))

import httpx
import pydicom

from benchmarks.ingest import Receiver, dcm_count, send, wait_for_echo
from tests.peers import LOOPBACK, free_port, start_process, stop_process
from tests.study_copies import copy_with_new_uids

TOKEN = "benchmark-token"
BOUNDARY = "aidx-benchmark"


def stow(url: str, study: Path) -> float:
    files = sorted(study.glob("*.dcm"))
    body = (
        b"".join(
            b"\r\n--"
            + BOUNDARY.encode()
            + b"\r\nContent-Type: application/dicom\r\n\r\n"
            + f.read_bytes()
            for f in files
        )
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )
    headers = {
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={BOUNDARY}',
        "Authorization": f"Bearer {TOKEN}",
    }
    start = time.perf_counter()
    response = httpx.post(f"{url}/studies", content=body, headers=headers, timeout=600)
    elapsed = time.perf_counter() - start
    stored = pydicom.Dataset.from_json(response.json()).get("ReferencedSOPSequence", [])
    if response.status_code != 200 or len(stored) != len(files):
        raise RuntimeError(
            f"STOW-RS answered {response.status_code} with {len(stored)}/{len(files)} stored"
        )
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", type=Path, help="a folder of *.dcm (default: a phantom)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--matrix", type=int, default=512)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="aidx-stow-bench-"))
    study = args.study
    if study is None:
        from training.phantom import PhantomOptions, generate

        generate(work / "phantom", PhantomOptions(slices=args.slices, matrix=args.matrix))
        study = work / "phantom" / "dicom"
    images = dcm_count(study)
    port, web_port = free_port(), free_port()
    config = work / "aidx.yaml"
    config.write_text(
        json.dumps(
            {
                "data_dir": str(work / "aidx-data"),
                "node": {"min_free_disk_mb": 0},
                "metrics": {"port": 0},
                "dicomweb": {
                    "port": web_port,
                    "peers": [
                        {
                            "name": "bench",
                            "token_sha256": hashlib.sha256(TOKEN.encode()).hexdigest(),
                        }
                    ],
                },
            }
        ),
        encoding="utf-8",
    )
    aidx = Path(sys.executable).parent / "aidx"
    command = [str(aidx), "--config", str(config), "serve", "--single-process", "--workers", "0"]
    process = start_process(
        [*command, "--no-ui", "--port", str(port), "--ae-title", "AIDX"], work / "aidx.log"
    )
    times: dict[str, list[float]] = {"dimse": [], "stow": []}
    try:
        wait_for_echo(port, process, work / "aidx.log")
        receiver = Receiver("AIDX", port, process.pid)
        for n in range(args.repeats):
            for method in ("dimse", "stow"):
                copy = copy_with_new_uids(study, work / f"{method}{n}")
                if method == "dimse":
                    seconds = send(receiver, [copy], work / "logs")
                else:
                    seconds = stow(f"http://{LOOPBACK}:{web_port}/dicomweb", copy)
                times[method].append(seconds)
                print(f"{method} run {n + 1}: {seconds:.2f} s ({images / seconds:.0f} images/s)")
    finally:
        stop_process(process)
    for line in (work / "aidx.log").read_text(encoding="utf-8").splitlines():
        if "STOW-RS from" in line:
            print("node:", line.split("aidx.dicomweb: ", 1)[-1])
    dimse, stow_s = statistics.median(times["dimse"]), statistics.median(times["stow"])
    print(f"\n{images} images ({study}), {platform.node()}, medians of {args.repeats}:")
    print(f"  DIMSE C-STORE (storescu): {dimse:.2f} s, {images / dimse:.0f} images/s")
    print(f"  STOW-RS (one request):    {stow_s:.2f} s, {images / stow_s:.0f} images/s")
    print(f"  STOW-RS / DIMSE: {stow_s / dimse:.2f}x (goal: at most 1.5x)")


if __name__ == "__main__":
    main()
