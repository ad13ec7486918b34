"""Training the two-stage detector's classifier (``inference.detector``) on CPU, resumably.

Three steps, each a command that can be interrupted and run again without losing work::

    python -m training.detector extract DATASET OUT --base lung-nodule@0.5.0 [--spacing 1.0]
    python -m training.detector train OUT [--minutes 40] [--resume]
    python -m training.detector export OUT --name lung-nodule --version 0.6.0 --base ...

``extract`` runs the serving path's own steps on each training case (``detector_input`` and the
detector's candidates: the same functions, so there is no train/serve skew) and keeps the crops
of every candidate with its label (a nodule within its radius, LUNA16's hit rule; candidates
within two millimetres beyond a radius are ambiguous and dropped) plus jittered crops at each
true nodule centre (so that a nodule the candidates miss still teaches the classifier); one
file per case, so a re-run skips what is done. ``train`` fits a small 3D CNN with balanced
batches, flips and axis swaps, a probability head (cross-entropy) and a diameter head (L1 on
log-diameter, for positives); it checkpoints every few minutes and ``--resume`` goes on from the
last checkpoint. ``export`` writes the model folder: the base network's ``model.onnx`` (the
first-stage candidate source) and ``classifier.onnx``, checked against PyTorch, and a card.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from inference.detector import Detector, crops, detector_input, fine_index
from inference.runner import RunnerOptions
from models.registry import (
    CandidateSettings,
    ClassifierSpec,
    DetectorSpec,
    ModelCard,
    ModelEntry,
    TensorSpec,
)

from .classifier_net import CROP, build_classifier, export_classifier, freeze_norms, from_onnx
from .dataset import Dataset
from .evaluate import case_as_volume
from .froc_io import evaluation_figures, operating_point

log = logging.getLogger("aidx.training")

JITTER_COPIES = 6  # jittered crops per true nodule centre
AMBIGUOUS_MM = 2.0


def default_spec(
    base: ModelCard, spacing_mm: float = 1.0, background_mm: float | None = None
) -> DetectorSpec:
    """The detector settings this module trains for (the shipped model's; see its card);
    ``background_mm``: the blobs of the image without its background (a white top-hat by a
    cube of that width, ``inference.candidates``)."""
    placeholder = TensorSpec(name="crops", shape=["batch", 2, CROP, CROP, CROP])
    return DetectorSpec(
        spacing_mm=spacing_mm,
        candidates=CandidateSettings(
            sigmas_mm=[0.9, 1.3, 1.8, 2.5, 3.5, 5.0, 7.0, 9.0],
            min_response=0.02,
            max_candidates=600,
            shape_power=1.0,
            lung_closing_mm=12.0,
            lung_margin_mm=4.0,
            background_mm=background_mm,
            network=True,
            network_min_probability=0.002,
            network_max_candidates=300,
        ),
        classifier=ClassifierSpec(
            file="classifier.onnx",
            sha256="0" * 64,
            input=placeholder,
            output=TensorSpec(name="scores", shape=["batch", 2]),
            crop_size=CROP,
        ),
    )


# ---------------------------------------------------------------------------- extraction
def extract(
    dataset_dir: Path,
    out: Path,
    base: ModelEntry,
    spacing_mm: float = 1.0,
    seed: int = 0,
    limit: int = 0,
    shard: tuple[int, int] = (0, 1),
    background_mm: float | None = None,
) -> int:
    """Crops and labels of every case of ``dataset_dir`` into ``out/crops`` (see module);
    returns how many cases were extracted now (the others were there already). ``shard``
    (k, n) takes every n-th case from the k-th, so n processes can share the work."""
    spec = default_spec(base.card, spacing_mm, background_mm)
    card = base.card.model_copy(update={"detector": spec})
    detector = Detector(
        ModelEntry(card, base.folder),
        RunnerOptions(providers=("CPUExecutionProvider",)),
        classifier=False,
    )
    dataset = Dataset.load(dataset_dir)
    folder = out / "crops"
    folder.mkdir(parents=True, exist_ok=True)
    (out / "spec.json").write_text(spec.model_dump_json(indent=2), encoding="utf-8")
    done = 0
    k, n = shard
    cases = dataset.cases[:limit] if limit else dataset.cases
    for position, case in enumerate(cases):
        target = folder / f"{case.id}.npz"
        if position % n != k or target.exists():
            continue
        rng = np.random.default_rng([seed, position])  # the same jitter whichever shard runs it
        t = time.perf_counter()
        volume = case_as_volume(case, dataset_dir)
        data = detector_input(volume, spec, card.input.hu_window)
        found = detector.candidates(data)
        centres = np.asarray([les.center_mm for les in case.lesions], dtype=np.float64)
        diameters = np.asarray([les.diameter_mm for les in case.lesions], dtype=np.float64)
        label, diameter, keep = label_candidates(
            data.pre.to_patient(found.index), centres, diameters
        )
        index = found.index[keep]
        source = (found.radius_mm[keep] < 0).astype(np.int8)
        jittered, j_diam = [], []
        for c, d in zip(centres, diameters, strict=True):
            at = fine_index(data.pre, c[None])[0]
            reach = min(2.0, d / 4.0) / spacing_mm
            for _ in range(JITTER_COPIES):
                jittered.append(at + rng.uniform(-reach, reach, 3))
                j_diam.append(d)
        all_index = np.concatenate([index, np.asarray(jittered).reshape(-1, 3)])
        batch = crops(data.pre.array, all_index, CROP)
        partial = folder / f".{case.id}.part"  # renamed when whole: a re-run never trusts half
        with partial.open("wb") as f:
            np.savez_compressed(
                f,
                crops=np.clip(np.rint(batch * 255.0), 0, 255).astype(np.uint8),
                label=np.concatenate([label[keep], np.ones(len(jittered), dtype=np.int8)]),
                diameter=np.concatenate([diameter[keep], np.asarray(j_diam)]).astype(np.float32),
                source=np.concatenate([source, np.full(len(jittered), 2, dtype=np.int8)]),
            )
        partial.replace(target)
        done += 1
        log.info(
            "case %s: %d candidates (%d on nodules), %d jittered, %.1f s",
            case.id,
            int(keep.sum()),
            int(label[keep].sum()),
            len(jittered),
            time.perf_counter() - t,
        )
    return done


def label_candidates(
    points: NDArray[np.float64], centres: NDArray[np.float64], diameters: NDArray[np.float64]
) -> tuple[NDArray[np.int8], NDArray[np.float64], NDArray[np.bool_]]:
    """(label, diameter of the nodule hit or 0, kept) for candidate points in patient mm."""
    n = len(points)
    label = np.zeros(n, dtype=np.int8)
    diameter = np.zeros(n)
    keep = np.ones(n, dtype=bool)
    if len(centres) == 0 or n == 0:
        return label, diameter, keep
    d = np.linalg.norm(points[:, None, :] - centres[None, :, :], axis=2)  # (n, nodules)
    radius = diameters[None, :] / 2.0
    inside = d <= radius
    hit = inside.any(axis=1)
    label[hit] = 1
    nearest = np.argmin(np.where(inside, d / radius, np.inf), axis=1)
    diameter[hit] = diameters[nearest[hit]]
    ambiguous = ~hit & (d <= radius + AMBIGUOUS_MM).any(axis=1)
    keep[ambiguous] = False
    return label, diameter, keep


# ---------------------------------------------------------------------------- training
@dataclass
class Crops:
    crops: NDArray[np.uint8]
    label: NDArray[np.int8]
    diameter: NDArray[np.float32]
    source: NDArray[np.int8]


def load_crops(folder: Path) -> Crops:
    parts = [np.load(p) for p in sorted(folder.glob("*.npz"))]
    if not parts:
        raise SystemExit(f"{folder}: no crops; run `python -m training.detector extract` first")
    return Crops(
        *(np.concatenate([p[k] for p in parts]) for k in ("crops", "label", "diameter", "source"))
    )


@dataclass(frozen=True)
class Schedule:
    """How ``train`` fits: the peak learning rate (cosine to 5e-5 over the wall-time budget),
    the sampling weight of a nodule under 6 mm against a larger one's (1: every nodule the same
    share), the classifier to start from (a ``classifier.onnx``; None: from scratch), and the
    axis orders the augmentation draws: "all" six, or "in-plane" (rows and columns swapped or
    not; the slice axis stays the first, so that the network may learn how a series' slices
    differ from its pixels). A resumed run keeps the schedule it was started with."""

    learning_rate: float = 2e-3
    small_weight: float = 1.0
    init_from: Path | None = None
    axes: str = "all"


def train(
    out: Path,
    minutes: float,
    resume: bool,
    batch_size: int = 32,
    seed: int = 0,
    schedule: Schedule | None = None,
) -> Path:
    """Fit the classifier on ``out/crops`` for ``minutes`` of wall time (on top of what a
    resumed run did); checkpoints ``out/classifier.pt`` every two minutes and at the end."""
    import torch  # noqa: PLC0415 - training only

    torch.manual_seed(seed)
    checkpoint = out / "classifier.pt"
    state = (
        torch.load(checkpoint, weights_only=False, map_location="cpu")
        if resume and checkpoint.exists()
        else None
    )
    if state is not None:
        kept = Schedule(**state.get("schedule", {}))
        if schedule is not None and schedule != kept:
            log.warning("a resumed run keeps the schedule it started with: %s", kept)
        schedule = kept
    schedule = schedule or Schedule()
    data = load_crops(out / "crops")
    pos = np.flatnonzero(data.label == 1)
    neg = np.flatnonzero(data.label == 0)
    log.info("training on %d crops: %d positive, %d negative", len(data.label), len(pos), len(neg))
    pos_p = nodule_weights(data.diameter[pos], schedule.small_weight)
    # a GPU when there is one (benchmarks/gpu_session.sh detector), else the CPU
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    start_from = schedule.init_from if state is None else None  # a resumed run loads its own
    net = (from_onnx(start_from) if start_from else build_classifier()).to(device)
    peak = schedule.learning_rate
    optimiser = torch.optim.AdamW(net.parameters(), lr=peak, weight_decay=1e-4)
    history: list[dict[str, float]] = []
    step = 0
    spent = 0.0
    if state is not None:
        net.load_state_dict(state["net"])
        optimiser.load_state_dict(state["optimiser"])
        history, step, spent = state["history"], state["step"], state["spent_s"]
        log.info("resumed at step %d (%.0f min spent)", step, spent / 60)
    rng = np.random.default_rng(seed + step)
    budget = spent + minutes * 60.0
    start = time.perf_counter() - spent
    last_save = time.perf_counter()
    net.train()
    if schedule.init_from:
        freeze_norms(net)
    losses: list[float] = []
    while time.perf_counter() - start < budget:
        n_pos = batch_size // 4
        idx = np.concatenate([rng.choice(pos, n_pos, p=pos_p), rng.choice(neg, batch_size - n_pos)])
        x = augment(data.crops[idx].astype(np.float32) / 255.0, rng, schedule.axes)
        y = torch.from_numpy(data.label[idx].astype(np.float32)).to(device)
        d = torch.from_numpy(np.log(np.maximum(data.diameter[idx], 1.0)).astype(np.float32))
        d = d.to(device)
        # cosine over the wall-time budget (what was spent plus this run's minutes)
        elapsed = time.perf_counter() - start
        lr = peak * 0.5 * (1 + math.cos(math.pi * min(1.0, elapsed / budget)))
        for group in optimiser.param_groups:
            group["lr"] = max(lr, 5e-5)
        out_t = net(torch.from_numpy(x).to(device))
        loss_cls = torch.nn.functional.binary_cross_entropy_with_logits(out_t[:, 0], y)
        mask = y > 0
        loss_d = (
            torch.nn.functional.smooth_l1_loss(out_t[mask, 1], d[mask], beta=0.1)
            if bool(mask.any())
            else out_t[:, 1].sum() * 0.0
        )
        loss = loss_cls + 0.5 * loss_d
        optimiser.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        optimiser.step()
        losses.append(float(loss.detach()))
        step += 1
        if step % 50 == 0:
            history.append({"step": step, "loss": float(np.mean(losses[-50:]))})
            log.info("step %d loss %.4f lr %.5f", step, history[-1]["loss"], lr)
        if time.perf_counter() - last_save > 120:
            _save(checkpoint, net, optimiser, history, step, time.perf_counter() - start, schedule)
            last_save = time.perf_counter()
    _save(checkpoint, net, optimiser, history, step, time.perf_counter() - start, schedule)
    return checkpoint


def nodule_weights(
    diameter: NDArray[np.floating], small_weight: float = 1.0
) -> NDArray[np.float64]:
    """Sampling weights of positive crops that give every nodule the same share: a large
    nodule has dozens of candidates on it, a 3 mm one a few (a case's nodules are told apart
    by their diameters); a nodule under 6 mm gets ``small_weight`` shares."""
    _, inverse, counts = np.unique(diameter, return_inverse=True, return_counts=True)
    weights = 1.0 / counts[inverse]
    weights = np.where(np.asarray(diameter) < 6.0, weights * small_weight, weights)
    return np.asarray(weights / weights.sum(), dtype=np.float64)


AXES = ("all", "in-plane")


def augment(
    x: NDArray[np.float32], rng: np.random.Generator, axes: str = "all"
) -> NDArray[np.float32]:
    """Random flips of the three axes and a random order of the axes (one per batch): any of
    the six (``axes`` "all") or, "in-plane", slices first and rows and columns either way."""
    for axis in (2, 3, 4):
        if rng.random() < 0.5:
            x = np.flip(x, axis=axis)
    if axes == "in-plane":
        order = np.array([0, *rng.permutation(2) + 1]) + 2
    else:
        order = rng.permutation(3) + 2
    return np.ascontiguousarray(np.transpose(x, (0, 1, *order)))


def _save(
    path: Path,
    net: Any,
    optimiser: Any,
    history: Any,
    step: int,
    spent: float,
    schedule: Schedule,
) -> None:
    import dataclasses  # noqa: PLC0415

    import torch  # noqa: PLC0415

    tmp = path.with_suffix(".tmp")
    torch.save(
        {
            "net": net.state_dict(),
            "optimiser": optimiser.state_dict(),
            "history": history,
            "step": step,
            "spent_s": spent,
            "schedule": dataclasses.asdict(schedule),
        },
        tmp,
    )
    tmp.replace(path)


# ---------------------------------------------------------------------------- export
def export(
    out: Path,
    base: ModelEntry,
    root: Path,
    version: str,
    training_command: str,
    evaluation: Path | None = None,
    operating_fp_rate: float = 1.0,
    threshold_from: Path | None = None,
    augment_top: int = 0,
    max_candidates: int | None = None,
    network_overlap: float | None = None,
    network_margin_mm: float | None = None,
) -> Path:
    """The model folder ``root/<name>/<version>``: the base network (first stage), the
    classifier and a card; with ``evaluation`` (a froc.json of this folder's model, from
    ``aidx evaluate``) the card gets its figures and the operating threshold at
    ``operating_fp_rate`` false positives per scan, taken from ``threshold_from`` (another
    froc.json: the selection set's, so that the held-out figures stay held out) when given.
    ``augment_top``: the classifier's flip-averaged candidates (``classifier.augment_top``);
    ``max_candidates``: blob candidates per scan at serving, when not the training's;
    ``network_overlap``: the first-stage network's sliding-window overlap at serving
    (``detector.candidates.network_overlap``; None: the configuration's);
    ``network_margin_mm``: its input's margin around the lungs' box
    (``detector.candidates.network_margin_mm``; None: the fine grid's cut)."""
    import datetime  # noqa: PLC0415
    import shutil  # noqa: PLC0415

    from models.registry import TrainingSpec, sha256_of  # noqa: PLC0415

    spec = DetectorSpec.model_validate_json((out / "spec.json").read_text(encoding="utf-8"))
    folder = root / base.card.name / version
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "model.onnx").exists():
        shutil.copyfile(base.onnx_path, folder / "model.onnx")
    classifier = folder / spec.classifier.file
    if not classifier.exists():
        diff = export_classifier(out / "classifier.pt", classifier)
        log.info("classifier exported, ONNX Runtime within %.1e of PyTorch", diff)
    serving: dict[str, Any] = {}
    if max_candidates is not None:
        serving["max_candidates"] = max_candidates
    if network_overlap is not None:
        serving["network_overlap"] = network_overlap
    if network_margin_mm is not None:
        serving["network_margin_mm"] = network_margin_mm
    if serving:
        spec = spec.model_copy(update={"candidates": spec.candidates.model_copy(update=serving)})
    spec = spec.model_copy(
        update={
            "classifier": spec.classifier.model_copy(
                update={
                    "sha256": sha256_of(classifier),
                    "input": TensorSpec(name="crops", shape=["batch", 2, CROP, CROP, CROP]),
                    "output": TensorSpec(name="scores", shape=["batch", 2]),
                    "augment_top": augment_top,
                }
            )
        }
    )
    threshold, figures = 0.5, {}
    if evaluation is not None:
        froc = json.loads(evaluation.read_text(encoding="utf-8"))
        figures = evaluation_figures(froc)
        chooser = froc
        if threshold_from is not None:
            chooser = json.loads(threshold_from.read_text(encoding="utf-8"))
        threshold, fp = operating_point(chooser, operating_fp_rate)
        figures["operating_fp_per_scan"] = fp
    crops_info = load_summary(out)
    width = spec.candidates.background_mm
    background = f" without the background (top-hat, {width:g} mm cube)" if width else ""
    card = base.card.model_copy(
        update={
            "version": version,
            "date": datetime.date.today(),
            "network": (
                f"two-stage: candidates (multi-scale blobs at {spec.spacing_mm:g} mm in the "
                f"lungs{background} + peaks of {base.ref}'s basic_unet), then a 3D CNN on "
                f"2x{CROP}³ crops"
            ),
            "description": (
                "Two-stage lung nodule detector: high-recall candidates inside the lungs on a "
                "fine grid, each scored by a crop classifier (probability and diameter)."
            ),
            "output": base.card.output.model_copy(
                update={"operating_threshold": threshold, "calibration": None}
            ),
            "training": TrainingSpec(data=crops_info, synthetic=True, command=training_command),
            "evaluation": figures,
            "detector": spec,
        }
    )
    (folder / "card.json").write_text(card.model_dump_json(indent=2) + "\n", encoding="utf-8")
    return folder


def load_summary(out: Path) -> str:
    data = load_crops(out / "crops")
    cases = len(list((out / "crops").glob("*.npz")))
    return (
        f"aidx-phantoms: {cases} synthetic chest-CT phantom cases, {len(data.label)} crops "
        f"({int((data.label == 1).sum())} on nodules); not patient data"
    )


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    parser = argparse.ArgumentParser(
        prog="python -m training.detector", description=__doc__.splitlines()[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("extract")
    ex.add_argument("dataset", type=Path)
    ex.add_argument("out", type=Path)
    ex.add_argument("--base", default="lung-nodule@0.5.0")
    ex.add_argument("--spacing", type=float, default=1.0)
    ex.add_argument("--limit", type=int, default=0, help="only the first N cases")
    ex.add_argument(
        "--shard", default="0/1", help="K/N: every N-th case from the K-th (N processes)"
    )
    ex.add_argument(
        "--background-mm",
        type=float,
        help="blob candidates of the image without its background: a white top-hat by a cube "
        "this wide (detector.candidates.background_mm; default: the image itself)",
    )
    tr = sub.add_parser("train")
    tr.add_argument("out", type=Path)
    tr.add_argument("--minutes", type=float, default=40.0)
    tr.add_argument("--resume", action="store_true")
    tr.add_argument(
        "--init-from",
        metavar="MODEL",
        help="start from this registered detector's classifier (e.g. lung-nodule@0.7.0) instead "
        "of from scratch",
    )
    tr.add_argument("--learning-rate", type=float, default=2e-3, help="the peak (cosine) rate")
    tr.add_argument(
        "--axes",
        choices=AXES,
        default="all",
        help="axis orders of the augmentation: all six, or in-plane (the slice axis stays)",
    )
    tr.add_argument(
        "--small-weight",
        type=float,
        default=1.0,
        help="sampling weight of a nodule under 6 mm against a larger one's",
    )
    exp = sub.add_parser("export")
    exp.add_argument("out", type=Path)
    exp.add_argument("--base", default="lung-nodule@0.5.0")
    exp.add_argument("--version", required=True)
    exp.add_argument("--root", type=Path, default=Path("aidx-data/models"))
    exp.add_argument("--evaluation", type=Path)
    exp.add_argument("--operating-fp-rate", type=float, default=1.0)
    exp.add_argument(
        "--threshold-from",
        type=Path,
        help="froc.json to choose the threshold on (default: --evaluation)",
    )
    exp.add_argument("--augment-top", type=int, default=0, help="flip-average the N best")
    exp.add_argument("--max-candidates", type=int, help="blob candidates per scan at serving")
    exp.add_argument(
        "--network-overlap",
        type=float,
        help="the first-stage network's sliding-window overlap at serving (default: the config's)",
    )
    exp.add_argument(
        "--network-margin-mm",
        type=float,
        help="the first-stage network's input: the lungs' box with this margin (default: the "
        "fine grid's cut, 20 mm)",
    )
    exp.add_argument("--training-command", default="see docs/models/lung-nodule.md")
    args = parser.parse_args(argv)
    if args.command == "extract":
        try:
            k, n = (int(v) for v in args.shard.split("/"))
            if not 0 <= k < n:
                raise ValueError
        except ValueError:
            parser.error(f"--shard takes K/N with 0 <= K < N, got {args.shard!r}")
        n = extract(
            args.dataset,
            args.out,
            _resolve(args.base),
            args.spacing,
            limit=args.limit,
            shard=(k, n),
            background_mm=args.background_mm,
        )
        print(f"extracted {n} cases into {args.out / 'crops'}")
    elif args.command == "train":
        init = None
        if args.init_from:
            entry = _resolve(args.init_from)
            if entry.card.detector is None:
                parser.error(f"--init-from {args.init_from}: not a two-stage detector")
            init = entry.folder / entry.card.detector.classifier.file
        schedule = Schedule(args.learning_rate, args.small_weight, init, args.axes)
        path = train(args.out, args.minutes, args.resume, schedule=schedule)
        print(f"checkpoint: {path}")
    elif args.command == "export":
        folder = export(
            args.out,
            _resolve(args.base),
            args.root,
            args.version,
            args.training_command,
            args.evaluation,
            args.operating_fp_rate,
            args.threshold_from,
            args.augment_top,
            args.max_candidates,
            args.network_overlap,
            args.network_margin_mm,
        )
        print(f"model folder: {folder}")
    return 0


def _resolve(ref: str) -> ModelEntry:
    import models  # noqa: PLC0415
    from models.registry import Registry  # noqa: PLC0415

    shipped = Path(models.__file__).resolve().parent / "shipped"
    return Registry(Path("aidx-data/models"), (shipped,)).resolve(ref, "lung-nodule")


if __name__ == "__main__":
    raise SystemExit(main())
