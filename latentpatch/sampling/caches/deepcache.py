"""DeepCache for the UNets (Ma et al. 2024, arXiv:2312.00858): the high-level features change slowly from step to
step, so on a cached call the UNet recomputes only its shallow path (conv_in, the down blocks down to `level`,
the up blocks from that level up, and the output layers) and takes the deeper up block's output from the last
full call. Installed as diffusers model hooks on the diffusers UNet's own blocks, which it then calls as always.

A down block's skip connections feed the up block of its level, so `level` 0 (the finest) recomputes the first
down and the last up block; the blocks below are reused whole. Every image keeps its own features (rows of the
stored outputs), so an image does not depend on its batch.
"""

from __future__ import annotations

from typing import Any

from diffusers.hooks import ModelHook
from torch import nn

from latentpatch.errors import UserError
from latentpatch.sampling.caches.hooks import ReuseHook, register, remove
from latentpatch.sampling.caches.schedule import CallCounter

HOOK, COUNTER = "latentpatch_deepcache", "latentpatch_deepcache_calls"


def check_level(unet: nn.Module, level: int) -> None:
    levels = len(unet.down_blocks)
    if level > levels - 2:
        raise UserError(f"--cache deepcache: level={level} leaves nothing to reuse in this UNet of {levels} levels; "
                        f"use a level from 0 to {levels - 2}")


def deep_blocks(unet: nn.Module, level: int) -> list[nn.Module]:
    """The blocks a cached call reuses: the down blocks below `level`, the mid block, the up blocks below it."""
    ups = len(unet.up_blocks)
    mid = [unet.mid_block] if unet.mid_block is not None else []
    return list(unet.down_blocks[level + 1:]) + mid + list(unet.up_blocks[: ups - 1 - level])


class _Count(ModelHook):
    """On the UNet: counts its calls and tells the block hooks whether this one reuses."""

    def __init__(self, state: Any) -> None:
        super().__init__()
        self.state = state

    def pre_forward(self, module: nn.Module, *args: Any, **kwargs: Any):
        self.state.reuse = not self.state.counter.advance()
        return args, kwargs


class DeepCache:
    def __init__(self, net: nn.Module, settings: dict[str, Any]) -> None:
        self.unet = net.unet
        check_level(self.unet, int(settings["level"]))
        self.counter = CallCounter(int(settings["warmup"]), int(settings["interval"]))
        self.reuse = False
        self.hooks = [ReuseHook(self) for _ in deep_blocks(self.unet, int(settings["level"]))]
        register(self.unet, _Count(self), COUNTER)
        for block, hook in zip(deep_blocks(self.unet, int(settings["level"])), self.hooks):
            register(block, hook, HOOK)

    def reset(self) -> None:
        self.counter.reset()
        self.reuse = False
        for hook in self.hooks:
            hook.output = None

    def remove(self) -> None:
        remove(self.unet, HOOK)
        remove(self.unet, COUNTER)
