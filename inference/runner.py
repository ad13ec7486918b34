"""ONNX Runtime runner (torch-free): a registered model over a preprocessed volume.

The model takes ``[batch, 1, z, y, x]`` and returns a per-voxel lesion probability of the same
shape (the card's output kind "probability": the sigmoid is inside the network). A volume is
read in patches of the card's ``patch_size`` by a sliding window whose arithmetic is MONAI's
``sliding_window_inference(mode="gaussian", sigma_scale=0.125, padding_mode="constant", cval=0)``
rewritten in numpy (same patch positions, same Gaussian importance map, same zero padding of a
volume smaller than the patch), so that the serving path gives the numbers training evaluated,
without importing torch. On large GPUs ``mode="whole"`` runs the volume in one pass instead.

Execution providers are taken in order of preference; one that this installation lacks is
skipped with a log line saying what runs instead, and ``OnnxRunner.provider`` says which runs.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnxruntime as ort
from numpy.typing import NDArray

from models.registry import ModelCard

log = logging.getLogger("aidx.inference.runner")

DEFAULT_PROVIDERS = (
    "TensorrtExecutionProvider",
    "CUDAExecutionProvider",
    "CPUExecutionProvider",
)
GPU_PROVIDERS = frozenset({"TensorrtExecutionProvider", "CUDAExecutionProvider"})
SIGMA_SCALE = 0.125  # MONAI's default: sigma = 0.125 × patch size along each axis
MIN_WEIGHT = 1e-3  # MONAI clamps the importance map to at least this (never zero weight)
WHOLE_DIVISOR_CAP = 32  # whole mode pads to a multiple of at most this (network stride)
Shape3 = tuple[int, int, int]
# What a CPU-only onnxruntime wheel offers (no GPU providers to miss).
CPU_ONLY_PROVIDERS = frozenset({"CPUExecutionProvider", "AzureExecutionProvider"})
_REPORTED_MISSING: set[str] = set()  # providers whose absence was already logged as a warning


class RunnerError(ValueError):
    """The model cannot be run as asked; the message says why and what to change."""


@dataclass(frozen=True)
class RunnerOptions:
    """How to run a model (``inference`` section of the configuration).

    ``batch_size`` windows go through the network per call; on CPU one window already keeps
    every core busy inside the 3D convolutions, so 1 is the default (a larger batch saves only
    the per-call overhead, which matters for toy networks, not for a U-Net, and costs memory).
    On GPU a few windows per call (2-8) fill the device better; the last batch is
    padded with empty windows there so that every call has the same shape (TensorRT engines
    and cuDNN algorithm choices are per shape). ``fp16`` lets the runner feed float16 to a model
    whose input is float16; a float16 model is refused without it, so that lower precision is
    always a deliberate choice. ``io_binding`` binds outputs to device memory on GPU providers
    (ignored on CPU). ``cudnn_conv_algo_search`` is HEURISTIC because EXHAUSTIVE can make 3D
    convolutions 2-3× slower (see DICOM-NOTES.md, Anchors). ``trt_cache_dir`` keeps built
    TensorRT engines between processes (building one takes minutes).
    """

    providers: tuple[str, ...] = DEFAULT_PROVIDERS
    intra_op_threads: int | None = None
    overlap: float = 0.25
    mode: Literal["sliding", "whole"] = "sliding"
    fp16: bool = False
    io_binding: bool = False
    batch_size: int = 1
    device_id: int = 0
    cudnn_conv_algo_search: Literal["EXHAUSTIVE", "HEURISTIC", "DEFAULT"] = "HEURISTIC"
    trt_cache_dir: Path | None = None
    warmup: bool = True  # one empty batch at start-up on GPU providers (autotuning, engines)

    def __post_init__(self) -> None:
        if not self.providers:
            raise RunnerError("no execution providers given; list at least CPUExecutionProvider")
        if not 0.0 <= self.overlap < 1.0:
            raise RunnerError(f"overlap must be in [0, 1), got {self.overlap}")
        if self.mode not in ("sliding", "whole"):
            raise RunnerError(f"mode must be 'sliding' or 'whole', got {self.mode!r}")
        if self.batch_size < 1:
            raise RunnerError(f"batch_size must be 1 or more, got {self.batch_size}")
        if self.intra_op_threads is not None and self.intra_op_threads < 1:
            raise RunnerError(
                f"intra_op_threads must be 1 or more (or null for ONNX Runtime's default), "
                f"got {self.intra_op_threads}"
            )


class OnnxRunner:
    """An ONNX Runtime session for one model version, with the card's input and output."""

    def __init__(
        self, onnx_path: Path, card: ModelCard, options: RunnerOptions | None = None
    ) -> None:
        self.options = options or RunnerOptions()
        self.path = Path(onnx_path)
        self.card = card
        self.patch_size: Shape3 = card.input.patch_size
        if any(p < 1 for p in self.patch_size):
            raise RunnerError(f"model {card.name}@{card.version}: bad patch_size {self.patch_size}")
        self._input_name = card.input.tensor.name
        self._output_name = card.output.tensor.name
        self._fixed_batch = self._check_layout(card)
        self.provider, providers = self._choose_providers()
        self.session = self._session(providers)
        self._input_dtype = self._check_session()
        self._gpu = self.provider in GPU_PROVIDERS
        self._binding_device: str | None = "cuda" if self._gpu and self.options.io_binding else None
        self.batch_size = self._fixed_batch or self.options.batch_size
        if self._fixed_batch and self.options.batch_size not in (1, self._fixed_batch):
            log.info(
                "model %s@%s has a fixed batch of %d; batch_size %d ignored",
                card.name,
                card.version,
                self._fixed_batch,
                self.options.batch_size,
            )
        log.info(
            "model %s@%s on %s: %s mode, patch %s, overlap %.2f, batch %d, input %s",
            card.name,
            card.version,
            self.provider,
            self.options.mode,
            "x".join(map(str, self.patch_size)),
            self.options.overlap,
            self.batch_size,
            np.dtype(self._input_dtype).name,
        )
        if self._gpu and self.options.warmup:
            self._run(np.zeros((1, 1, *self.patch_size), dtype=np.float32))

    # ------------------------------------------------------------------------------ predicting
    def predict(self, array: NDArray[np.floating]) -> NDArray[np.float32]:
        """The probability map ``[z, y, x]`` (float32, 0..1) of a preprocessed volume."""
        if array.ndim != 3 or min(array.shape) < 1:
            raise RunnerError(
                f"predict takes one preprocessed volume [z, y, x], got shape {array.shape}"
            )
        volume = np.ascontiguousarray(array, dtype=np.float32)
        if self.options.mode == "whole":
            return self._predict_whole(volume)
        return self._predict_sliding(volume)

    def _predict_sliding(self, volume: NDArray[np.float32]) -> NDArray[np.float32]:
        padded, crop = _pad_to(volume, self.patch_size)
        starts = window_starts(padded.shape, self.patch_size, self.options.overlap)
        weight = importance_map(self.patch_size)
        total = np.zeros(padded.shape, dtype=np.float32)
        count = np.zeros(padded.shape, dtype=np.float32)
        pz, py, px = self.patch_size
        for chunk in _chunks(starts, self.batch_size):
            windows = [(slice(z, z + pz), slice(y, y + py), slice(x, x + px)) for z, y, x in chunk]
            batch = np.stack([padded[w] for w in windows])[:, None]
            out = self._run(batch)
            for i, w in enumerate(windows):
                total[w] += out[i, 0] * weight
                count[w] += weight
        total /= count
        return np.ascontiguousarray(total[crop])

    def _predict_whole(self, volume: NDArray[np.float32]) -> NDArray[np.float32]:
        # Whatever the network's stride, a patch it accepts is a multiple of it: pad the volume
        # to at least the patch and to a multiple of the patch's common power of two.
        divisor = _common_power_of_two(self.patch_size)
        target = tuple(
            -(-max(n, p) // divisor) * divisor
            for n, p in zip(volume.shape, self.patch_size, strict=True)
        )
        padded, crop = _pad_to(volume, target)
        out = self._run(padded[None, None])
        return np.ascontiguousarray(out[0, 0][crop])

    def _run(self, batch: NDArray[np.float32]) -> NDArray[np.float32]:
        """The network on ``batch`` [n, 1, z, y, x]; returns float32 of the same shape."""
        n = batch.shape[0]
        # GPU: every patch call has the same shape (see RunnerOptions); a whole volume is alone.
        same_shape = self._gpu and batch.shape[2:] == self.patch_size
        size = self._fixed_batch or (self.batch_size if same_shape else n)
        if n < size:
            fill = np.zeros((size - n, *batch.shape[1:]), dtype=batch.dtype)
            batch = np.concatenate([batch, fill])
        feed = np.ascontiguousarray(batch, dtype=self._input_dtype)
        if self._binding_device is not None:
            binding = self.session.io_binding()
            binding.bind_cpu_input(self._input_name, feed)
            binding.bind_output(self._output_name, self._binding_device, self.options.device_id)
            self.session.run_with_iobinding(binding)
            result = binding.copy_outputs_to_cpu()[0]
        else:
            result = self.session.run([self._output_name], {self._input_name: feed})[0]
        out = np.asarray(result)
        if out.shape != feed.shape:
            raise RunnerError(
                f"model {self.card.name}@{self.card.version} returned shape {out.shape} for input "
                f"{feed.shape}; the card's output must be a one-channel probability map the size "
                "of the input"
            )
        return np.asarray(out[:n], dtype=np.float32)

    # ------------------------------------------------------------------------------ set-up
    def _check_layout(self, card: ModelCard) -> int | None:
        """The fixed batch size of the card's input (None if dynamic), after checking layout."""
        ref = f"model {card.name}@{card.version}"
        for spec, what in ((card.input.tensor, "input"), (card.output.tensor, "output")):
            shape = spec.shape
            if len(shape) != 5 or (isinstance(shape[1], int) and shape[1] != 1):
                raise RunnerError(
                    f"{ref}: the {what} {spec.name!r} has shape {shape}; the runner needs "
                    "[batch, 1, z, y, x]"
                )
        spatial = card.input.tensor.shape[2:]
        static = [v for v in spatial if isinstance(v, int)]
        if static and list(spatial) != list(self.patch_size):
            raise RunnerError(
                f"{ref}: the input's spatial shape {spatial} is neither dynamic nor the "
                f"patch_size {list(self.patch_size)}; correct the card"
            )
        if static and self.options.mode == "whole":
            raise RunnerError(
                f"{ref}: mode 'whole' needs dynamic spatial axes, the input is fixed at "
                f"{spatial}; set inference.mode to 'sliding'"
            )
        batch = card.input.tensor.shape[0]
        return batch if isinstance(batch, int) else None

    def _choose_providers(self) -> tuple[str, list[str | tuple[str, dict[str, Any]]]]:
        available = set(ort.get_available_providers())
        wanted = list(dict.fromkeys(self.options.providers))
        usable = [p for p in wanted if p in available]
        if not usable:
            raise RunnerError(
                f"none of the execution providers {', '.join(wanted)} is available in this "
                f"ONNX Runtime (it offers {', '.join(sorted(available))}); add "
                "CPUExecutionProvider to inference.providers, or install onnxruntime-gpu for "
                "CUDA and TensorRT"
            )
        first = usable[0]
        # A CPU-only ONNX Runtime (the default install) is expected to lack the GPU providers:
        # said at DEBUG. A GPU build that lacks one: a warning the first time in a process, then
        # quieter (every study would repeat it).
        cpu_only = available <= CPU_ONLY_PROVIDERS
        for p in wanted[: wanted.index(first)]:
            if cpu_only:
                level = logging.DEBUG
            else:
                level = logging.INFO if p in _REPORTED_MISSING else logging.WARNING
            _REPORTED_MISSING.add(p)
            log.log(
                level,
                "execution provider %s is not available in this ONNX Runtime; falling back to %s",
                p,
                first,
            )
        # The usable ones after the first stay in the list: ONNX Runtime places the nodes the
        # first cannot run (TensorRT's unsupported operators) on the next.
        return first, [self._with_options(p) for p in usable]

    def _with_options(self, provider: str) -> str | tuple[str, dict[str, Any]]:
        o = self.options
        if provider == "CUDAExecutionProvider":
            return provider, {
                "device_id": o.device_id,
                "cudnn_conv_algo_search": o.cudnn_conv_algo_search,
            }
        if provider == "TensorrtExecutionProvider":
            trt: dict[str, Any] = {"device_id": o.device_id, "trt_fp16_enable": o.fp16}
            if o.trt_cache_dir is not None:
                o.trt_cache_dir.mkdir(parents=True, exist_ok=True)
                trt |= {
                    "trt_engine_cache_enable": True,
                    "trt_engine_cache_path": str(o.trt_cache_dir),
                }
            return provider, trt
        return provider

    def _session(self, providers: list[str | tuple[str, dict[str, Any]]]) -> Any:
        settings = ort.SessionOptions()
        if self.options.intra_op_threads is not None:
            settings.intra_op_num_threads = self.options.intra_op_threads
        try:
            session = ort.InferenceSession(str(self.path), settings, providers=providers)
        except Exception as exc:  # ORT raises its own exception types; name the file and fix
            raise RunnerError(
                f"{self.path}: ONNX Runtime cannot load the model with {self.provider}: {exc}; "
                "check the file against its card (`aidx models show`) or choose another provider"
            ) from exc
        running = session.get_providers()[0]
        if running != self.provider:
            # Listed as available but failed to start (missing CUDA/cuDNN libraries, no device);
            # ONNX Runtime has logged why.
            log.warning(
                "execution provider %s failed to start (see ONNX Runtime's message); "
                "falling back to %s",
                self.provider,
                running,
            )
            self.provider = running
        return session

    def _check_session(self) -> type[np.floating[Any]]:
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        names = ([i.name for i in inputs], [o.name for o in outputs])
        if names != ([self._input_name], [self._output_name]):
            raise RunnerError(
                f"{self.path}: inputs {names[0]} and outputs {names[1]} differ from the card's "
                f"{self._input_name!r} and {self._output_name!r}; the card belongs to another model"
            )
        types: dict[str, type[np.floating[Any]]] = {
            "tensor(float)": np.float32,
            "tensor(float16)": np.float16,
        }
        dtype = types.get(inputs[0].type)
        if dtype is None:
            raise RunnerError(f"{self.path}: input type {inputs[0].type} is not float32/float16")
        if dtype is np.float16 and not self.options.fp16:
            raise RunnerError(
                f"{self.path}: the model takes float16 input; set inference.fp16 to true to run "
                "it in half precision, or register its float32 export"
            )
        if (
            self.options.fp16
            and dtype is np.float32
            and self.provider != "TensorrtExecutionProvider"
        ):
            log.info("fp16 asked for, but %s takes float32 input: running in float32", self.path)
        return dtype


# ---------------------------------------------------------------------------------- numerics
def importance_map(
    patch_size: Sequence[int], sigma_scale: float = SIGMA_SCALE
) -> NDArray[np.float32]:
    """MONAI's Gaussian importance map (``compute_importance_map``, mode "gaussian").

    The product over axes of ``exp(-x² / (2 σ²))`` with x the offset from the patch centre and
    ``σ = sigma_scale × size``; unnormalised (the blend divides by the summed weights anyway),
    and clamped below at 1e-3 so that no voxel of a window has zero weight.
    """
    weight: NDArray[np.float32] = np.ones((), dtype=np.float32)
    for n in patch_size:
        sigma = n * sigma_scale
        x = np.arange(-(n - 1) / 2.0, (n - 1) / 2.0 + 1, dtype=np.float32)
        g = np.exp(x**2 / np.float32(-2 * sigma**2)).astype(np.float32)
        weight = np.multiply.outer(weight, g)
    floor = max(float(weight.min()), MIN_WEIGHT)
    return np.maximum(weight, np.float32(floor)).astype(np.float32)


def window_starts(
    image_size: Sequence[int], patch_size: Sequence[int], overlap: float
) -> list[tuple[int, ...]]:
    """Start corners of the sliding windows, as MONAI's ``dense_patch_slices`` places them.

    Windows step by ``int(patch × (1 − overlap))`` (1 at least; a whole patch where the image
    is exactly one patch long), and the last window along each axis is pulled back to end at
    the image border. ``image_size`` is at least ``patch_size`` (pad first).
    """
    per_axis = []
    for n, p in zip(image_size, patch_size, strict=True):
        step = p if n == p else max(int(p * (1 - overlap)), 1)
        count = next(d for d in range(n) if d * step + p >= n) + 1
        per_axis.append([d * step - max(d * step + p - n, 0) for d in range(count)])
    return list(itertools.product(*per_axis))


def _pad_to(
    volume: NDArray[np.float32], size: Sequence[int]
) -> tuple[NDArray[np.float32], tuple[slice, ...]]:
    """Zero-pad each axis shorter than ``size`` (half before, the rest after, as MONAI does),
    and the slices that crop the result back to the original."""
    before = [max(s - n, 0) // 2 for n, s in zip(volume.shape, size, strict=True)]
    after = [max(s - n, 0) - b for n, s, b in zip(volume.shape, size, before, strict=True)]
    crop = tuple(slice(b, b + n) for b, n in zip(before, volume.shape, strict=True))
    if not any(before) and not any(after):
        return volume, crop
    padded = np.pad(volume, list(zip(before, after, strict=True)), mode="constant")
    return padded, crop


def _common_power_of_two(patch_size: Shape3) -> int:
    divisor = 1
    while divisor < WHOLE_DIVISOR_CAP and all(p % (divisor * 2) == 0 for p in patch_size):
        divisor *= 2
    return divisor


def _chunks(items: list[tuple[int, ...]], size: int) -> Iterator[list[tuple[int, ...]]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]
