"""Which device a stage runs on: one rule for every command and API call."""

from __future__ import annotations

import os

import torch

from latentpatch.errors import UserError


def resolve_device(device: str | torch.device | None = None, local_rank: int = 0) -> torch.device:
    """None means CUDA when available, else the CPU; 'cuda' picks the local rank's GPU (an explicit index)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise UserError(f"--device {device!r} is not a device torch knows (use cpu, cuda or cuda:N)") from e
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {device} was asked for, but CUDA is not available on this machine")
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    return device


def free_memory(device: torch.device) -> int:
    """Bytes a new allocation can take on `device` now: the GPU's free memory, or the host's available memory."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:  # MemAvailable counts reclaimable caches, as the kernel would free them
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def training_autocast(precision: str, device: torch.device):
    """A factory of the autocast context a run computes in (train.precision): bf16 for "bf16", and for "auto" on
    CUDA; its held-out scores use it too, so a later score of the run's weights is the number its log shows."""
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
