"""Sampling caches (`--cache`): reuse what earlier network calls of a batch computed. The method is chosen once per
job (`job_cache`), installed as hooks on the denoiser's network, reset before each batch and removed when the job
ends, so the loaded run is left as it was.

    step       DiTs, SD3 / FLUX: diffusers' TaylorSeer hook on each block's attention and MLP (caches/step.py)
    deepcache  UNets: DeepCache, the deep path's features reused                      (caches/deepcache.py)
    ras        DiTs: region-adaptive sampling, a share of each image's tokens updated  (caches/ras.py)

`spec.py` is the option's language (and its defaults), `schedule.py` the one rule of which calls run in full.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

from torch import nn

from latentpatch.errors import UserError
from latentpatch.sampling.caches.spec import METHODS, CacheSpec, parse_cache


class NoCache:
    """Caching off: the denoiser as loaded."""

    def __init__(self, precond: nn.Module) -> None:
        self.precond = precond

    def fresh(self) -> nn.Module:
        return self.precond

    def remove(self) -> None:
        pass


class InstalledCache:
    """A cache's hooks on `precond.net`: `fresh()` clears what the last batch left and gives the denoiser."""

    def __init__(self, precond: nn.Module, cache: Any) -> None:
        self.precond, self.cache = precond, cache

    def fresh(self) -> nn.Module:
        self.cache.reset()
        return self.precond

    def remove(self) -> None:
        self.cache.remove()


def _methods(net: nn.Module) -> dict[str, Callable[[nn.Module, dict[str, Any]], Any]]:
    """The methods that fit this network, by name -> their installer."""
    from latentpatch.sampling.caches.deepcache import DeepCache
    from latentpatch.sampling.caches.ras import RegionCache
    from latentpatch.sampling.caches.step import StepCache

    return {"DiT": {"step": StepCache, "ras": RegionCache},
            "PretrainedDiT": {"step": StepCache, "ras": RegionCache},
            # the flow transformers: the step cache only (region-adaptive sampling needs a token route through
            # their joint blocks, which their wrappers do not have)
            "SD3Network": {"step": StepCache}, "FluxNetwork": {"step": StepCache},
            # both call a diffusers UNet's own blocks (net.unet)
            "UNetDenoiser": {"deepcache": DeepCache}, "SDXLNetwork": {"deepcache": DeepCache},
            }.get(type(net).__name__, {})


def _kind(net: nn.Module) -> str:
    return {"DiT": "this project's DiT", "PretrainedDiT": "a pretrained DiT (DiT-XL/2)",
            "UNetDenoiser": "a UNet", "SDXLNetwork": "SDXL's UNet", "SD3Network": "an SD3 transformer",
            "FluxNetwork": "a FLUX transformer"}.get(type(net).__name__, type(net).__name__)


def check_cache(precond: nn.Module, cache: str | None) -> CacheSpec | None:
    """The parsed spec, or a UserError in one line when the method does not fit this run's network."""
    if cache is None:
        return None
    spec = parse_cache(cache)
    fitting = _methods(precond.net)
    if spec.method not in fitting:
        others = f"use --cache {' or '.join(fitting)}" if fitting else "no cache method fits it"
        raise UserError(f"--cache {spec.method} is for {METHODS[spec.method].networks}; this run's network is "
                        f"{_kind(precond.net)}: {others}")
    if spec.method == "deepcache":
        from latentpatch.sampling.caches.deepcache import check_level

        check_level(precond.net.unet, int(spec.settings["level"]))
    return spec


@contextmanager
def job_cache(precond: nn.Module, cache: str | None) -> Iterator[NoCache | InstalledCache]:
    """The job's denoiser source: `.fresh()` before each batch gives `precond` with the cache cleared."""
    spec = check_cache(precond, cache)
    installed = NoCache(precond) if spec is None else \
        InstalledCache(precond, _methods(precond.net)[spec.method](precond.net, spec.settings))
    try:
        yield installed
    finally:
        installed.remove()


__all__ = ["check_cache", "job_cache", "parse_cache", "CacheSpec"]
