"""Where the engine runs and how: device, precision, memory format, host copies, batch size.

CUDA changes only the *defaults* here (channels-last, pinned copies, batches of 8,
cuDNN autotuning); every one of them is an option the CPU can take as well, through the
same code. So CI, which has no GPU, runs every path a GPU runs. This is the one module of
the engine that asks whether a device is CUDA (tests/test_device.py keeps it so).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch

from . import roi_align as triton_roi_align
from .boxes import NMS_METHODS

ROI_ALIGN_METHODS = ("torchvision", "threads", "triton")
# torch.compile's modes for the backbone: reduce-overhead replays it as a CUDA Graph (one
# launch for a batch's hundreds of kernels; the box head, whose shapes vary, stays default)
COMPILE_MODES = ("default", "reduce-overhead")

PRECISIONS: dict[str, torch.dtype | None] = {
    "fp32": None,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}


def resolve_device(device: str | torch.device) -> torch.device:
    """`auto` picks CUDA when present; asking for CUDA without one is a clear error."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"--device {device}: CUDA is not available on this machine")
    return resolved


def is_cuda(device: torch.device) -> bool:
    return device.type == "cuda"


def _default_roi_align(cuda: bool) -> str:
    if not cuda:
        return "threads"
    return "triton" if triton_roi_align.available() else "torchvision"


@dataclass(frozen=True)
class DeviceOptions:
    """How a predictor runs. Build it with `DeviceOptions.create`, which fills what is left
    as None with the device's measured best."""

    device: torch.device
    precision: str = "fp32"  # autocast dtype of the network; boxes and scores stay fp32
    channels_last: bool = False  # NHWC activations (tensor cores want them)
    pin_memory: bool = False  # page-locked host tensors, copied without blocking
    batch_size: int = 1  # images (tiles) per forward pass
    cudnn_benchmark: bool = False  # autotune convolutions for fixed tile shapes
    roi_budget_mb: int = 512  # largest fp32 pooled-feature chunk of the ROI heads
    nms: str = "exact"  # one greedy NMS per batch in tensor ops; or "torchvision"
    roi_align: str = "torchvision"  # or "threads" (CPU), "triton" (C4 heads): roi_align.py
    fold_norms: bool = True  # frozen batch norms folded into their convolutions (fp32)
    # torch.compile the backbone and the box head (opt-in): a mode of COMPILE_MODES
    compile: str | None = None
    exact: bool = False  # every optimisation that changes rounding off (see `create`)

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r} is not one of {sorted(PRECISIONS)}")
        if self.batch_size < 1:
            raise ValueError(f"batch size {self.batch_size} must be at least 1")
        if self.roi_budget_mb < 1:
            raise ValueError(f"ROI budget {self.roi_budget_mb} MB must be at least 1")
        if self.nms not in NMS_METHODS:
            raise ValueError(f"NMS method {self.nms!r} is not one of {NMS_METHODS}")
        if self.roi_align not in ROI_ALIGN_METHODS:
            raise ValueError(f"ROIAlign {self.roi_align!r} is not one of {ROI_ALIGN_METHODS}")
        if self.compile is not None and self.compile not in COMPILE_MODES:
            raise ValueError(f"compile mode {self.compile!r} is not one of {COMPILE_MODES}")
        if self.roi_align == "triton" and not triton_roi_align.available():
            raise ValueError("ROIAlign 'triton' needs the triton package (pip install triton)")

    @classmethod
    def create(
        cls,
        device: str | torch.device = "auto",
        precision: str = "fp32",
        channels_last: bool | None = None,
        pin_memory: bool | None = None,
        batch_size: int | None = None,
        roi_budget_mb: int | None = None,
        nms: str = "exact",
        roi_align: str | None = None,
        fold_norms: bool | None = None,
        compile: str | None = None,
        exact: bool = False,
    ) -> DeviceOptions:
        """Defaults measured per device: NHWC everywhere (on CPU, with the frozen norms
        folded, 13-20% faster than NCHW: docs/benchmarks.md); on CPU, batches beyond 2
        images cost more per image; a GPU wants full batches and pinned copies, and has the
        memory for ROI chunks of 4 GB (a batch of 16 tiles in 3 chunks) and the Triton
        ROIAlign where Triton is installed; the CPU shares the ROIs among its threads
        (torchvision's CPU ROIAlign runs on one core). Norms are folded into convolutions
        on the CPU in fp32 only: in bf16 the folded bias is rounded to 8 bits relative to the shift
        rather than to the output, which cost TridentNet-Fast 2 of its 37 detectron2 twins
        (measured on CPU), and on CUDA eager the bias costs its own pass, so folding was
        slower there (see docs/benchmarks.md).

        `exact` runs as detectron2's DefaultPredictor rounds: fp32, NCHW, norms unfolded,
        torchvision's ROIAlign, one image per pass, no autotuning or TF32 (on the CPU the
        shared fixtures then match detectron2 bit for bit: tests/test_fidelity.py)."""
        resolved = resolve_device(device)
        cuda = is_cuda(resolved)
        if exact:
            _check_exact(precision, channels_last, roi_align, fold_norms, compile)
            return cls(resolved, pin_memory=cuda if pin_memory is None else pin_memory,
                       batch_size=1 if batch_size is None else batch_size,
                       roi_budget_mb=(4096 if cuda else 512) if roi_budget_mb is None
                       else roi_budget_mb, nms=nms, fold_norms=False, exact=True)
        return cls(
            resolved,
            precision,
            True if channels_last is None else channels_last,
            cuda if pin_memory is None else pin_memory,
            (8 if cuda else 1) if batch_size is None else batch_size,
            cuda,
            (4096 if cuda else 512) if roi_budget_mb is None else roi_budget_mb,
            nms,
            _default_roi_align(cuda) if roi_align is None else roi_align,
            (not cuda and precision == "fp32") if fold_norms is None else fold_norms,
            compile,
        )

    def settings(self) -> dict:
        """The arguments of `create` that give these options again."""
        return {"device": self.device, "precision": self.precision,
                "channels_last": self.channels_last, "pin_memory": self.pin_memory,
                "batch_size": self.batch_size, "roi_budget_mb": self.roi_budget_mb,
                "nms": self.nms, "roi_align": self.roi_align, "fold_norms": self.fold_norms,
                "compile": self.compile, "exact": self.exact}

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return PRECISIONS[self.precision]

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def autocast(self) -> contextlib.AbstractContextManager:
        """The network's reduced precision (CPU autocast takes bf16 and fp16 too)."""
        dtype = self.autocast_dtype
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def apply_backend_flags(self) -> None:
        """cuDNN autotuning pays off when every batch has the tile's shape; a no-op flag on
        CPU."""
        if self.cudnn_benchmark:
            torch.backends.cudnn.benchmark = True
        if self.exact and is_cuda(self.device):  # process-wide: an exact run is one mode
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False

    def to_host_staging(self, tensor: torch.Tensor) -> torch.Tensor:
        """A host tensor ready to cross to the device: page-locked when `pin_memory`, so the
        copy runs asynchronously. Called on the CPU threads that prepare images."""
        return tensor.pin_memory() if self.pin_memory else tensor

    def to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self.device, non_blocking=True)


def run_settings(args: Any) -> dict[str, Any]:
    """A command's `--device --precision --channels-last --compile --exact` as a
    Predictor's keyword arguments: one reading for predict, serve, prelabel and its Ray
    replicas."""
    return {"device": args.device, "precision": args.precision,
            "channels_last": args.channels_last, "compile": args.compile,
            "exact": args.exact}


def _check_exact(precision: str, channels_last: bool | None, roi_align: str | None,
                 fold_norms: bool | None, compile: str | None) -> None:
    """Refuse a setting `exact` would have to ignore, naming it."""
    clashes = [name for name, clash in (
        (f"--precision {precision}", precision != "fp32"),
        ("--channels-last", channels_last is True),
        (f"roi_align {roi_align}", roi_align not in (None, "torchvision")),
        ("fold_norms", fold_norms is True),
        ("--compile", compile is not None)) if clash]
    if clashes:
        raise ValueError(f"exact mode runs fp32, NCHW, unfolded and uncompiled: drop "
                         f"{', '.join(clashes)} or the exact mode")


def training_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype training runs in; `auto` is detectron2's AMP on CUDA (fp16 with
    loss scaling) and fp32 on CPU, where both reduced precisions can still be asked for."""
    if precision == "auto":
        precision = "fp16" if is_cuda(device) else "fp32"
    if precision not in PRECISIONS:
        raise ValueError(
            f"training precision {precision!r} is not one of {['auto', *sorted(PRECISIONS)]}"
        )
    return PRECISIONS[precision]


def distributed_setup(device: torch.device, local_rank: int) -> tuple[str, torch.device]:
    """The process group backend and this process's device under torchrun: NCCL and one GPU
    per process where there are GPUs, else gloo on the CPU (the pair CI tests)."""
    if is_cuda(device):
        return "nccl", torch.device("cuda", local_rank)
    return "gloo", device


def synchronize(device: torch.device) -> None:
    """Wait for queued device work (timing); nothing to wait for on the CPU."""
    if is_cuda(device):
        torch.cuda.synchronize(device)


def release_cached_memory(device: torch.device) -> None:
    """Give cached blocks back after an out-of-memory error, so the next case starts clean."""
    if is_cuda(device):
        torch.cuda.empty_cache()


def profiler_activities(device: torch.device) -> list[torch.profiler.ProfilerActivity]:
    """What torch.profiler records for work on `device`: host calls, and kernels on CUDA."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if is_cuda(device):
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    return activities


def device_name(device: torch.device) -> str:
    if is_cuda(device):
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"
