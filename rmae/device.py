"""One device policy for every command that runs a model.

``auto`` picks CUDA, else Apple MPS, else the CPU. An explicit device that is not there is a
:class:`DeviceError` with one line saying so and what to use instead — never a traceback from
deep inside torch when the first tensor moves.
"""

from __future__ import annotations

import re

import torch

from .errors import UserError

DEVICE_FORMS = "auto, cpu, cuda, cuda:N or mps"
_DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


class DeviceError(UserError, ValueError):
    """The requested device does not exist on this machine (or is not a device name)."""


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def check_device_name(request: str | torch.device | None) -> str:
    """The normalised device name, or :class:`DeviceError` if it is not one (availability is
    not checked: configs are validated on one machine and may run on another)."""
    text = "auto" if request is None else str(request).strip().lower()
    if not _DEVICE_RE.match(text):
        raise DeviceError(f"device={request}: not a device; use {DEVICE_FORMS}")
    return text


def resolve_device(request: str | torch.device | None = "auto", local_rank: int = 0) -> torch.device:
    """``request`` (``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` | ``mps``, or a ``torch.device``)
    → the device to use. ``local_rank`` picks the GPU under ``auto`` (one per process in DDP)."""
    if isinstance(request, torch.device):
        request = str(request)
    text = check_device_name(request)
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device(f"cuda:{local_rank % max(1, torch.cuda.device_count())}")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(text)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device={request}: CUDA is not available on this machine; use device=auto or device=cpu")
        index = device.index if device.index is not None else local_rank
        if index >= torch.cuda.device_count():
            raise DeviceError(f"device={request}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                              f"(cuda:0…cuda:{torch.cuda.device_count() - 1})")
        return torch.device("cuda", index)
    if device.type == "mps" and not _mps_available():
        raise DeviceError(f"device={request}: Apple MPS is not available on this machine; use device=auto or device=cpu")
    return device


def autocast(device: torch.device, precision: str = "fp32"):
    """``torch.autocast`` for ``precision`` (``fp32`` = off, ``bf16``, ``fp16``) on ``device``."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"precision={precision}: use fp32, bf16 or fp16")
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
