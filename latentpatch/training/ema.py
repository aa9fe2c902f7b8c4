"""Exponential moving average of the weights, with EDM's half-life in images and ramp-up.

Karras et al. 2022 (NVlabs/edm training/training_loop.py): the half-life is counted in training images,
not steps, so it does not change with the batch size; early in training it is capped at
`rampup * cur_nimg`, so the average forgets the random initialisation quickly.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def ema_beta(cur_nimg: float, batch_nimg: float, halflife_kimg: float, rampup: float | None) -> float:
    """beta = 0.5 ** (batch_nimg / halflife_nimg), halflife_nimg = min(halflife_kimg*1000, cur_nimg*rampup).

    `cur_nimg` is the number of images seen before this step, `batch_nimg` the images of this step.
    """
    halflife_nimg = halflife_kimg * 1000.0
    if rampup is not None:
        halflife_nimg = min(halflife_nimg, cur_nimg * rampup)
    return 0.5 ** (batch_nimg / max(halflife_nimg, 1e-8))


def make_ema(module: nn.Module) -> nn.Module:
    """A frozen copy of `module` in eval mode that holds the average. Parameters that do not train (a LoRA
    fine-tune's frozen base) are the module's own tensors, not copies: their average is themselves, and a base of
    billions of parameters (FLUX.1: 12 B) is then held once, not twice."""
    frozen = [p for p in module.parameters() if not p.requires_grad]
    ema = copy.deepcopy(module, memo={id(p): p for p in frozen})  # deepcopy's memo: those tensors are not copied
    return ema.eval().requires_grad_(False)


@torch.no_grad()
def update_ema(ema: nn.Module, module: nn.Module, beta: float) -> None:
    """ema <- beta * ema + (1 - beta) * module for the parameters that train; buffers are copied as they are."""
    pairs = [(e, p.detach()) for e, p in zip(ema.parameters(), module.parameters()) if p.requires_grad]
    if len(list(ema.parameters())) != len(list(module.parameters())):
        raise ValueError("the EMA copy and the module have different parameters")
    if pairs:
        torch._foreach_lerp_([e for e, _ in pairs], [p for _, p in pairs], 1.0 - beta)
    for b_ema, b in zip(ema.buffers(), module.buffers()):
        b_ema.copy_(b)
