"""One attention function with a backend switch (PyTorch SDPA or xFormers), chosen once per network.

q, k, v are [B, heads, L, d]; `mask` is a key padding mask [B, Lk] (bool, True = attend). Modules store
the resolved backend name at construction and pass it here; nothing else branches on the backend.

Masked attention (cross-attention on padded text) always runs through SDPA, which broadcasts the [B, 1, 1, Lk]
mask inside its kernels: xFormers would need a dense [B, heads, Lq, Lk] bias built on every forward and kept
for the backward.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from latentpatch.errors import UserError

BACKENDS = ("sdpa", "xformers")


def _xformers_problem(device: torch.device | str) -> str | None:
    """None when xFormers imports and runs a tiny attention on `device`; else what went wrong.

    Importing is not enough: a wheel built for another PyTorch imports but has no CUDA kernels.
    """
    try:
        import xformers.ops as xops  # optional CUDA extra; imported lazily

        q = torch.zeros(1, 8, 1, 8, device=device, dtype=torch.float16)
        xops.memory_efficient_attention(q, q, q)
    except Exception as error:  # ImportError, or NotImplementedError from a kernel-less build
        return f"{type(error).__name__}: {str(error).strip().splitlines()[0][:200]}"
    return None


def resolve_backend(requested: str, device: torch.device | str | None) -> str:
    """Map "auto" | "sdpa" | "xformers" to the backend that runs on `device` (xformers only on CUDA)."""
    on_cuda = device is not None and torch.device(device).type == "cuda"
    if requested == "sdpa":
        return "sdpa"
    if requested == "auto":
        return "xformers" if on_cuda and _xformers_problem(device) is None else "sdpa"
    if requested == "xformers":
        if not on_cuda:
            raise UserError(
                f"model.attention=xformers needs a CUDA device, but the network runs on {device}; "
                "use attention=sdpa or auto"
            )
        problem = _xformers_problem(device)
        if problem is not None:
            raise UserError(
                f"model.attention=xformers but xFormers does not run here ({problem}); install the extra "
                "built for this PyTorch (pip install 'latentpatch[cuda]') or use attention=sdpa or auto"
            )
        return "xformers"
    raise UserError(f"model.attention: unknown backend {requested!r}; choose auto, sdpa or xformers")


def _sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    attn_mask = None if mask is None else mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


def _xformers(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    if mask is not None:
        return _sdpa(q, k, v, mask)
    import xformers.ops as xops

    out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)  # xFormers works in [B, L, heads, d]


_IMPLEMENTATIONS: dict[str, Callable[[Tensor, Tensor, Tensor, Tensor | None], Tensor]] = {
    "sdpa": _sdpa,
    "xformers": _xformers,
}


def attention(q: Tensor, k: Tensor, v: Tensor, *, mask: Tensor | None = None, backend: str) -> Tensor:
    """softmax(q k^T / sqrt(d)) v over [B, heads, L, d], keys with mask False left out."""
    return _IMPLEMENTATIONS[backend](q, k, v, mask)
