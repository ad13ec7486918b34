"""One study from DICOM files to findings, SR and SEG: what ``aidx infer`` (and, later, the
workers of ``aidx serve``) run.

select series -> volume -> preprocess (the model card's spacing, orientation, HU window) ->
ONNX Runtime (sliding window) -> postprocess to findings -> findings.json, SR, SEG.
"""

from __future__ import annotations

import logging
import resource
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.dataset import Dataset

from aidx.config import AidxConfig
from aidx.deflate import InflateLimitError, inflated_size
from models.registry import ModelEntry

from .detector import Detector
from .findings import FindingsReport
from .key_images import write_key_images
from .kos import write_kos
from .postprocess import findings_from_probability
from .preprocess import PreprocessSpec, preprocess
from .runner import OnnxRunner, RunnerOptions
from .seg import write_seg
from .series import SeriesRules, select_series, series_rules
from .sr import write_sr
from .volume import load_series, slice_sources

log = logging.getLogger("aidx.inference")


class NotApplicableError(ValueError):
    """The study has nothing the model can read; the message is the recorded reason."""


@dataclass
class InferenceResult:
    report: FindingsReport
    findings_path: Path
    sr_path: Path
    seg_path: Path | None
    provider: str
    timings: dict[str, float] = field(default_factory=dict)
    peak_rss_mb: float = 0.0
    key_images: list[Path] = field(default_factory=list)
    kos_path: Path | None = None  # the key slices as a Key Object Selection (when asked for)
    # the SR variant Cornerstone3D/OHIF hydrate into editable tools (when asked for)
    cornerstone_sr_path: Path | None = None


def runner_options(config: AidxConfig) -> RunnerOptions:
    i = config.inference
    return RunnerOptions(
        providers=tuple(i.providers),
        intra_op_threads=i.intra_op_threads,
        overlap=i.overlap,
        mode=i.mode,
        fp16=i.fp16,
        io_binding=i.io_binding,
    )


def infer_study(
    input_dir: Path,
    out_dir: Path,
    config: AidxConfig,
    model: ModelEntry,
    min_probability: float | None = None,
    key_images: bool = False,
    kos: bool = False,
    cornerstone_sr: bool = False,
) -> InferenceResult:
    """Run the model on the study's eligible series and write the results into ``out_dir``."""
    files = sorted(p for p in Path(input_dir).rglob("*") if p.is_file())
    return infer_files(
        files,
        out_dir,
        config,
        model,
        min_probability=min_probability,
        key_images=key_images,
        kos=kos,
        cornerstone_sr=cornerstone_sr,
    )


def within_inflate_limit(files: list[Path], limit: int) -> list[Path]:
    """``files`` less the deflated ones that inflate past ``limit`` (pydicom would inflate them
    whole, without a bound, before reading a single attribute); each one left out is logged."""
    kept: list[Path] = []
    for path in files:
        try:
            inflated_size(path, limit)
        except InflateLimitError:
            log.warning("%s left out: its deflated data set inflates past %d bytes", path, limit)
            continue
        except (OSError, ValueError, EOFError, zlib.error):
            pass  # not a readable Part 10 file: series selection skips it as before
        kept.append(path)
    return kept


def infer_files(
    files: list[Path],
    out_dir: Path,
    config: AidxConfig,
    model: ModelEntry,
    *,
    rules: SeriesRules | None = None,
    min_probability: float | None = None,
    key_images: bool = False,
    kos: bool = False,
    cornerstone_sr: bool = False,
    revision: int = 1,
    previous_versions: Sequence[Dataset] = (),
    runners: dict[Path, OnnxRunner | Detector] | None = None,
) -> InferenceResult:
    """Run the model on the eligible series among ``files`` (one study) and write the results
    into ``out_dir``. ``rules`` default to ``inference.series``; ``revision`` and
    ``previous_versions`` go to the SR (a re-run of an updated study); ``runners`` caches ONNX
    Runtime sessions between calls (a worker's). ``key_images``: Secondary Captures of the key
    slices too; ``kos``: a Key Object Selection of them (``kos.dcm``, when there are findings);
    ``cornerstone_sr``: the SR variant that Cornerstone3D hydrates into editable tools
    (``sr-cornerstone.dcm``, docs/results.md)."""
    timings: dict[str, float] = {}
    start = time.perf_counter()
    files = within_inflate_limit(files, config.node.max_dataset_bytes)
    selection = select_series(files, rules or series_rules(config))
    if selection.chosen is None:
        raise NotApplicableError(selection.reason())
    volume = load_series(selection.chosen.files)
    timings["read_s"] = time.perf_counter() - start

    card = model.card
    threshold = card.output.operating_threshold if min_probability is None else min_probability
    cached = runners.get(model.onnx_path) if runners is not None else None
    if card.detector is not None:
        t = time.perf_counter()
        detector = cached if isinstance(cached, Detector) else None
        if detector is None:
            detector = Detector(model, runner_options(config))
            if runners is not None:
                runners[model.onnx_path] = detector
        findings, steps = detector.detect(
            volume,
            threshold,
            merge_distance_mm=config.inference.merge_distance_mm,
        )
        timings["model_s"] = time.perf_counter() - t
        timings |= {f"detector_{k}": v for k, v in steps.items()}
        provider = detector.provider
    else:
        t = time.perf_counter()
        pre = preprocess(volume, PreprocessSpec(card.input.spacing_mm, card.input.hu_window))
        timings["preprocess_s"] = time.perf_counter() - t

        t = time.perf_counter()
        runner = cached if isinstance(cached, OnnxRunner) else None
        if runner is None:
            runner = OnnxRunner(model.onnx_path, card, runner_options(config))
            if runners is not None:
                runners[model.onnx_path] = runner
        probability = runner.predict(pre.array)
        timings["model_s"] = time.perf_counter() - t

        t = time.perf_counter()
        findings = findings_from_probability(
            probability,
            pre,
            volume,
            threshold,
            min_volume_mm3=config.inference.min_volume_mm3,
            merge_distance_mm=config.inference.merge_distance_mm,
            calibration=card.output.calibration,
        )
        provider = runner.provider
        timings["postprocess_s"] = time.perf_counter() - t

    t = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    report = FindingsReport(
        volume.study_uid, volume.series_uid, card.name, card.version, tuple(findings)
    )
    findings_path = out_dir / "findings.json"
    report.write(findings_path)
    # One header per slice, each file read once (a multi-frame instance's for each of its
    # frames, with the frame numbers beside them).
    slices = slice_sources(volume)
    sources: list[Dataset] = [s.header for s in slices]
    frames = volume.frames or None
    sr_path = out_dir / "sr.dcm"
    write_sr(findings, sources, card, sr_path, revision, previous_versions, frames=frames)
    seg_path = None
    if findings:
        seg_path = out_dir / "seg.dcm"
        write_seg(findings, sources, card, seg_path, revision, frames)
    key_image_paths = (
        write_key_images(findings, volume, sources, card, out_dir / "key_images")
        if key_images
        else []
    )
    kos_path = (
        write_kos(findings, sources, card, out_dir / "kos.dcm", revision, frames) if kos else None
    )
    cornerstone_path = None
    if cornerstone_sr:
        cornerstone_path = out_dir / "sr-cornerstone.dcm"
        write_sr(
            findings, sources, card, cornerstone_path, revision, previous_versions, True, frames
        )
    timings["write_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    log.info(
        "inference done: study_uid=%s series_uid=%s model=%s findings=%d provider=%s %.2f s",
        volume.study_uid,
        volume.series_uid,
        model.ref,
        len(findings),
        provider,
        timings["total_s"],
    )
    return InferenceResult(
        report,
        findings_path,
        sr_path,
        seg_path,
        provider,
        timings,
        peak,
        key_image_paths,
        kos_path,
        cornerstone_path,
    )
