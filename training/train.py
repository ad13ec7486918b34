"""Training loop (MONAI / PyTorch): `aidx train --config configs/train/NAME.yaml`.

Cases of a canonical dataset are brought to the model's frame with the serving path's own
preprocessing (no train/serve skew), labels resampled to the same grid with nearest neighbour;
patches are sampled balanced between lesion and background (MONAI RandCropByPosNegLabeld),
flipped and rotated; the U-Net body learns with Dice + cross-entropy on logits, and the exported
network adds the sigmoid. Checkpoints every epoch (``--resume`` continues), seeded, AMP on GPU,
validation every N epochs with LUNA16 FROC (CPM, the serving postprocessing), early stopping,
curves as PNG.
Several processes (``torchrun --nproc_per_node N -m training.train ...``) train with DDP.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import yaml
from monai.data.dataloader import DataLoader
from monai.data.dataset import Dataset
from monai.inferers.utils import sliding_window_inference
from monai.losses.dice import DiceCELoss
from monai.transforms.compose import Compose
from monai.transforms.croppad.dictionary import RandCropByPosNegLabeld
from monai.transforms.spatial.dictionary import RandFlipd, RandRotate90d
from monai.transforms.utility.dictionary import DeleteItemsd
from PIL import Image, ImageDraw
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from scipy import ndimage
from tqdm import tqdm

from inference.postprocess import findings_from_probability
from inference.preprocess import Preprocessed, PreprocessSpec, preprocess
from inference.volume import Volume
from models.networks import ProbabilityNet, build_network

from .dataset import Case, case_label
from .dataset import Dataset as CanonicalDataset
from .evaluate import case_as_volume
from .froc import Detection, Nodule, Scan
from .froc import evaluate as froc_evaluate

log = logging.getLogger("aidx.train")
VALIDATION_MIN_PROBABILITY = 0.05  # low, so that the FROC curve has its low thresholds
BACKGROUND_STRIDE = 8
CENTRES_PER_LESION = 64
SMALL_LESION_MM = 6.0
HARD_NEGATIVE_MARGIN = 2  # voxels around a lesion that are not counted as its false positive


class TrainConfig(BaseModel):
    """configs/train/*.yaml; unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")
    dataset: Path
    output: Path
    network: str = "basic_unet"
    features: int = Field(default=16, ge=4)
    spacing_mm: tuple[float, float, float] = (2.0, 1.4, 1.4)
    hu_window: tuple[float, float] = (-1000.0, 400.0)
    patch_size: tuple[int, int, int] = (48, 96, 96)
    # Sliding-window patch for validation and serving (the card); the network is fully
    # convolutional, and a larger window than the training patch is faster. Default: patch_size.
    inference_patch_size: tuple[int, int, int] | None = None
    batch_size: int = Field(default=2, ge=1)
    samples_per_case: int = Field(default=4, ge=1)
    positive_fraction: float = Field(default=0.5, gt=0, lt=1)
    epochs: int = Field(default=20, ge=1)
    learning_rate: float = Field(default=1e-3, gt=0)
    # Initial output probability (bias of the last layer); see _prior_bias.
    prior_probability: float = Field(default=0.01, gt=0, lt=0.5)
    validation_fraction: float = Field(default=0.2, ge=0, lt=1)
    validate_every: int = Field(default=2, ge=1)
    early_stopping_patience: int = Field(default=5, ge=1)
    seed: int = 0
    amp: bool = True  # used on GPU only
    progress: bool = True  # progress bar per epoch (on a terminal)
    # Processes preparing cases and drawing patches (0: in the training process). On a GPU the
    # patch sampling is the bottleneck without them.
    num_workers: int = Field(default=0, ge=0)
    # Stop after the epoch during which this many minutes of training have passed (validated
    # then, so the best model is kept); None: no limit. Makes a run fit a session or a lease.
    time_limit_minutes: float | None = Field(default=None, gt=0)
    # "cosine": the learning rate falls from learning_rate to 0 over the run (its share of
    # time_limit_minutes when set, else of epochs); "constant" keeps it.
    lr_schedule: Literal["constant", "cosine"] = "constant"
    # Start from these weights (a best.pt or checkpoint.pt), e.g. to fine-tune a shipped model.
    init_weights: Path | None = None
    # Hard-negative mining (needs init_weights): this share of the background patches is centred
    # on voxels that the starting network calls lesion (probability >= 0.5) away from every
    # lesion: its false positives, found once by running it over the training cases.
    hard_negative_fraction: float = Field(default=0.0, ge=0, lt=1)
    # Lesions smaller than SMALL_LESION_MM (equivalent-sphere diameter on the model grid) get
    # this many times the positive patches of the others: the small ones are the ones missed.
    small_lesion_factor: int = Field(default=1, ge=1)

    @model_validator(mode="after")
    def _mining_needs_weights(self) -> TrainConfig:
        if self.hard_negative_fraction > 0 and self.init_weights is None:
            raise ValueError(
                "hard_negative_fraction needs init_weights (the network whose false positives "
                "are mined); set init_weights or hard_negative_fraction: 0"
            )
        return self

    @classmethod
    def load(cls, path: Path) -> TrainConfig:
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
            return cls.model_validate(data)
        except (OSError, yaml.YAMLError) as exc:
            raise ValueError(f"{path}: cannot read the training config: {exc}") from exc
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
            )
            raise ValueError(f"{path}: {problems}") from None


@dataclass
class History:
    epochs: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    val_epochs: list[int] = field(default_factory=list)
    val_cpm: list[float] = field(default_factory=list)
    best_cpm: float = -1.0
    best_epoch: int = 0


@dataclass
class PreparedCase:
    """A case on the model's grid: the training item, and what FROC validation needs."""

    item: dict[str, np.ndarray]
    pre: Preprocessed
    volume: Volume
    nodules: tuple[Nodule, ...]


def prepare_cases(config: TrainConfig) -> list[PreparedCase]:
    """Image and label of every case on the model's grid (image in 0..1, label 0/1)."""
    dataset = CanonicalDataset.load(config.dataset)
    spec = PreprocessSpec(config.spacing_mm, config.hu_window)
    rng = np.random.default_rng(config.seed)
    jobs = [
        (case, config.dataset, spec, int(rng.integers(2**31)), config.small_lesion_factor)
        for case in dataset.cases
    ]
    if config.num_workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=min(config.num_workers, len(jobs))) as pool:
            return list(pool.map(_prepare_case, *zip(*jobs, strict=True)))
    return [_prepare_case(*job) for job in jobs]


def _prepare_case(
    case: Case, root: Path, spec: PreprocessSpec, seed: int, small_factor: int = 1
) -> PreparedCase:
    volume = case_as_volume(case, root)
    pre = preprocess(volume, spec)
    loaded = case_label(case, root)
    if loaded is None:
        raise ValueError(f"case {case.id!r} has no label; training needs lesion masks")
    label = loaded[0]
    zoom = np.asarray(pre.array.shape) / np.asarray(label.shape)
    resampled = ndimage.zoom((label > 0).astype(np.uint8), zoom, order=0, grid_mode=False)
    if resampled.shape != pre.array.shape:
        raise ValueError(f"case {case.id!r}: label grid {resampled.shape} != {pre.array.shape}")
    flat = resampled.ravel()
    item = {
        "image": pre.array[None].astype(np.float32),
        "label": resampled[None].astype(np.float32),
        # Patch centres, computed once (MONAI would otherwise scan the volume per draw).
        "fg": _lesion_balanced_centres(
            resampled, np.random.default_rng(seed), small_factor, float(np.prod(spec.spacing_mm))
        ),
        # Background centres are thinned: any of them is as good as its neighbours.
        "bg": np.flatnonzero(flat == 0)[::BACKGROUND_STRIDE],
    }
    nodules = tuple(Nodule(les.center_mm, les.diameter_mm) for les in case.lesions)
    return PreparedCase(item, pre, volume, nodules)


def _lesion_balanced_centres(
    label: np.ndarray,
    rng: np.random.Generator,
    small_factor: int = 1,
    voxel_mm3: float = 1.0,
) -> np.ndarray:
    """Flat indices of lesion voxels, CENTRES_PER_LESION drawn from each lesion (26-connected
    component): a positive patch is then centred on each lesion equally often. Drawn from all
    voxels, a 28 mm nodule (~1 500 voxels at 2 x 1.4 x 1.4 mm) would take a hundred times the
    patches of a 6 mm one, and the network would learn only large nodules. Lesions under
    SMALL_LESION_MM get ``small_factor`` times as many."""
    components, count = ndimage.label(label > 0, structure=np.ones((3, 3, 3)))
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    flat = components.ravel()
    order = np.argsort(flat, kind="stable")
    starts = np.searchsorted(flat[order], np.arange(1, count + 2))
    small_voxels = math.pi / 6 * SMALL_LESION_MM**3 / voxel_mm3
    centres = [
        rng.choice(
            order[starts[k] : starts[k + 1]],
            CENTRES_PER_LESION * (small_factor if starts[k + 1] - starts[k] < small_voxels else 1),
            replace=True,
        )
        for k in range(count)
    ]
    return np.concatenate(centres).astype(np.int64)


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(config: TrainConfig, resume: bool = False, command: str = "") -> History:
    """Train; returns the loss and validation history. Writes checkpoints, the best model's
    weights and ``curves.png`` into ``config.output``."""
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        torch.distributed.init_process_group("gloo" if not torch.cuda.is_available() else "nccl")
    rank = torch.distributed.get_rank() if distributed else 0
    world = torch.distributed.get_world_size() if distributed else 1
    _seed(config.seed + rank)
    device = (
        torch.device("cuda", rank % torch.cuda.device_count())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )
    items = prepare_cases(config)
    n_val = round(len(items) * config.validation_fraction) if len(items) > 1 else 0
    val_items, train_items = items[:n_val], items[n_val:]
    train_items = train_items[rank::world] or train_items
    transforms = Compose(
        [
            RandCropByPosNegLabeld(
                keys=["image", "label"],
                label_key="label",
                spatial_size=config.patch_size,
                pos=config.positive_fraction,
                neg=1.0 - config.positive_fraction,
                num_samples=config.samples_per_case,
                fg_indices_key="fg",
                bg_indices_key="bg",
                allow_smaller=True,
            ),
            DeleteItemsd(keys=["fg", "bg"]),
            RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=2),
            RandRotate90d(keys=["image", "label"], prob=0.3, spatial_axes=(1, 2)),
        ]
    )
    torch.backends.cudnn.benchmark = device.type == "cuda"
    net: ProbabilityNet = build_network(config.network, config.features).to(device)  # type: ignore[arg-type]
    _prior_bias(net, config.prior_probability)
    if config.init_weights is not None:
        initial = torch.load(config.init_weights, map_location="cpu", weights_only=False)
        net.load_state_dict(initial["network_state"])
        log.info("started from the weights in %s", config.init_weights)
    if config.hard_negative_fraction > 0:
        mined = _mine_hard_negatives(net, train_items, config, device)
        log.info("hard negatives: %d voxels in %d cases", mined, len(train_items))
    loader = DataLoader(
        Dataset([c.item for c in train_items], transforms),
        batch_size=config.batch_size,
        shuffle=True,
        num_workers=config.num_workers,
        persistent_workers=config.num_workers > 0,
    )
    body: torch.nn.Module = net.body
    if distributed:
        body = torch.nn.parallel.DistributedDataParallel(body)
    optimizer = torch.optim.AdamW(body.parameters(), lr=config.learning_rate)
    # Dice per patch: a patch centred on a 6 mm nodule counts as much as one on a 28 mm nodule
    # (over the whole batch, the large one's voxels would drown the small one). In patches
    # without a lesion the Dice term is flat (no gradient); cross-entropy does the work there.
    loss_fn = DiceCELoss(sigmoid=True)
    use_amp = config.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    config.output.mkdir(parents=True, exist_ok=True)
    checkpoint_path = config.output / "checkpoint.pt"
    history, start_epoch = History(), 1
    if resume and checkpoint_path.exists():
        state = torch.load(checkpoint_path, map_location=device, weights_only=False)
        net.load_state_dict(state["network_state"])
        optimizer.load_state_dict(state["optimizer_state"])
        history = History(**state["history"])
        start_epoch = int(state["epoch"]) + 1
        log.info("resumed from epoch %d", start_epoch - 1)
    stale = 0
    training_started = time.perf_counter()
    for epoch in range(start_epoch, config.epochs + 1):
        body.train()
        losses = []
        started = time.perf_counter()
        bar = tqdm(
            loader,
            desc=f"epoch {epoch}/{config.epochs}",
            unit="batch",
            disable=rank != 0 or not config.progress,
            leave=False,
        )
        for batch in bar:
            if config.lr_schedule == "cosine":
                for group in optimizer.param_groups:
                    group["lr"] = config.learning_rate * _cosine(
                        config, epoch, time.perf_counter() - training_started
                    )
            images, labels = batch["image"].to(device), batch["label"].to(device)
            optimizer.zero_grad()
            with torch.autocast(device.type, enabled=use_amp):
                loss = loss_fn(body(images), labels)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        history.epochs.append(epoch)
        history.train_loss.append(float(np.mean(losses)) if losses else float("nan"))
        if rank == 0:
            log.info(
                "epoch %d/%d: loss %.4f (%.1f s)",
                epoch,
                config.epochs,
                history.train_loss[-1],
                time.perf_counter() - started,
            )
        out_of_time = config.time_limit_minutes is not None and (
            time.perf_counter() - training_started > 60 * config.time_limit_minutes
        )
        if val_items and (epoch % config.validate_every == 0 or out_of_time):
            dice = _validate(net, val_items, config, device)
            if rank == 0:
                log.info("epoch %d: validation CPM %.3f", epoch, dice)
            history.val_epochs.append(epoch)
            history.val_cpm.append(dice)
            if dice > history.best_cpm:
                history.best_cpm, history.best_epoch, stale = dice, epoch, 0
                if rank == 0:
                    torch.save(_export_state(net, config, command), config.output / "best.pt")
            else:
                stale += 1
        if rank == 0:
            torch.save(
                {
                    "epoch": epoch,
                    "command": command,
                    "network_state": net.state_dict(),
                    "optimizer_state": optimizer.state_dict(),
                    "history": history.__dict__,
                    "config": json.loads(config.model_dump_json()),
                },
                checkpoint_path,
            )
        if out_of_time:
            log.info("time limit (%s min) reached at epoch %d", config.time_limit_minutes, epoch)
            break
        if stale >= config.early_stopping_patience:
            log.info("early stop at epoch %d (best %d)", epoch, history.best_epoch)
            break
    if rank == 0:
        if not val_items:
            torch.save(_export_state(net, config, command), config.output / "best.pt")
        plot_curves(history, config.output / "curves.png")
    if distributed:
        torch.distributed.destroy_process_group()
    return history


def _cosine(config: TrainConfig, epoch: int, elapsed_s: float) -> float:
    """The cosine schedule's factor (1 -> 0) at this point of the run."""
    if config.time_limit_minutes is not None:
        done = elapsed_s / (60 * config.time_limit_minutes)
    else:
        done = (epoch - 1) / max(config.epochs, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(max(done, 0.0), 1.0)))


def _mine_hard_negatives(
    net: ProbabilityNet, cases: list[PreparedCase], config: TrainConfig, device: torch.device
) -> int:
    """Run the starting network over each case; its false-positive voxels (probability >= 0.5,
    more than HARD_NEGATIVE_MARGIN voxels from any lesion) join the case's background centres,
    drawn (with repeats) so that they make up ``hard_negative_fraction`` of them."""
    net.eval()
    total = 0
    rng = np.random.default_rng(config.seed)
    with torch.inference_mode():
        for case in cases:
            prob = _probability(net, case, config, device)
            lesion = ndimage.binary_dilation(
                case.item["label"][0] > 0, iterations=HARD_NEGATIVE_MARGIN
            )
            hard = np.flatnonzero(((prob >= 0.5) & ~lesion).ravel())
            total += hard.size
            if hard.size:
                bg = case.item["bg"]
                share = config.hard_negative_fraction
                draws = max(1, round(share / (1 - share) * bg.size))
                case.item["bg"] = np.concatenate([bg, rng.choice(hard, draws, replace=True)])
    net.train()
    return total


def _prior_bias(net: ProbabilityNet, prior: float) -> None:
    """Start the output layer at the lesion prior (RetinaNet's trick): logits begin near
    log(p / (1 - p)), so early steps learn lesions instead of "almost everything is background"."""
    last = [m for m in net.body.modules() if isinstance(m, torch.nn.Conv3d)][-1]
    if last.bias is not None:
        torch.nn.init.constant_(last.bias, float(np.log(prior / (1.0 - prior))))


def _export_state(net: ProbabilityNet, config: TrainConfig, command: str = "") -> dict[str, Any]:
    return {
        "command": command,  # how it was trained (the model card says so)
        "network": config.network,
        "features": config.features,
        "network_state": net.state_dict(),
        "config": json.loads(config.model_dump_json()),
    }


def _probability(
    net: ProbabilityNet, case: PreparedCase, config: TrainConfig, device: torch.device
) -> np.ndarray:
    """The network's probability map of a whole case, by the serving path's sliding window
    (Gaussian blending, overlap 0.25); call under ``torch.inference_mode``."""
    image = torch.from_numpy(case.item["image"])[None].to(device)
    prob = sliding_window_inference(
        image,
        config.inference_patch_size or config.patch_size,
        4,
        net,
        overlap=0.25,
        mode="gaussian",
        sigma_scale=0.125,
    )
    assert isinstance(prob, torch.Tensor)
    return np.asarray(prob[0, 0].cpu().numpy())


def _validate(
    net: ProbabilityNet,
    cases: list[PreparedCase],
    config: TrainConfig,
    device: torch.device,
) -> float:
    """CPM (LUNA16 FROC) on the validation cases, with the serving path's postprocessing."""
    net.eval()
    scans = []
    with torch.inference_mode():
        for i, case in enumerate(cases):
            findings = findings_from_probability(
                _probability(net, case, config, device),
                case.pre,
                case.volume,
                VALIDATION_MIN_PROBABILITY,
            )
            detections = tuple(Detection(f.center_mm, f.probability) for f in findings)
            scans.append(Scan(str(i), case.nodules, detections))
    if not any(scan.nodules for scan in scans):
        return 0.0
    return float(froc_evaluate(scans, bootstrap=0).cpm)


def plot_curves(history: History, path: Path) -> None:
    """Training loss and validation CPM per epoch, drawn with Pillow."""
    width, height, pad = 640, 360, 40
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle([pad, pad, width - pad, height - pad], outline="black")
    last = max(history.epochs or [1])

    def xy(epoch: float, value: float, top: float) -> tuple[float, float]:
        x = pad + (width - 2 * pad) * (epoch - 1) / max(last - 1, 1)
        y = height - pad - (height - 2 * pad) * min(max(value / top, 0.0), 1.0)
        return x, y

    top = max([v for v in history.train_loss if np.isfinite(v)] or [1.0])
    points = [xy(e, v, top) for e, v in zip(history.epochs, history.train_loss, strict=True)]
    if len(points) > 1:
        draw.line(points, fill="blue", width=2)
    dice = [xy(e, v, 1.0) for e, v in zip(history.val_epochs, history.val_cpm, strict=True)]
    if len(dice) > 1:
        draw.line(dice, fill="green", width=2)
    for p in dice:
        draw.ellipse([p[0] - 3, p[1] - 3, p[0] + 3, p[1] + 3], fill="green")
    draw.text(
        (pad, 10), f"training loss (blue, max {top:.3f}), validation CPM (green)", fill="black"
    )
    image.save(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="aidx train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    history = train(
        TrainConfig.load(args.config),
        resume=args.resume,
        command=f"aidx train --config {args.config}",
    )
    print(json.dumps({"epochs": len(history.epochs), "best_cpm": history.best_cpm}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
