"""The `--cache` option's language: METHOD[:name=value,...], each method with its few settings and defaults.

A spec is written back in one canonical form (every setting named, in a fixed order, defaults filled in), which
is what job.json and each PNG record, so `--cache ras` and `--cache ras:ratio=0.5,interval=4,warmup=2` are the
same job. Only the form is checked here; whether a method fits a run's network is the method's to say.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from latentpatch.errors import UserError


@dataclass(frozen=True)
class Setting:
    name: str
    kind: type  # int or float
    default: int | float
    low: float  # smallest allowed value
    high: float = math.inf
    low_open: bool = False  # low itself not allowed

    def parse(self, method: str, text: str) -> int | float:
        try:
            value = self.kind(text)
        except ValueError:
            value = None
        inside = value is not None and (value > self.low if self.low_open else value >= self.low) \
            and value <= self.high and math.isfinite(value)
        if not inside:
            bound = f"{'>' if self.low_open else '>='} {self.low:g}" + (f" and <= {self.high:g}" if self.high < math.inf else "")
            what = "a whole number" if self.kind is int else "a number"
            raise UserError(f"--cache {method}: {self.name} must be {what} {bound}, got {text!r}")
        return value


@dataclass(frozen=True)
class Method:
    networks: str  # in words, for the help and the refusals
    settings: tuple[Setting, ...]


# `interval` means the same in every method: after `warmup` full network calls, one call in `interval` runs the
# whole network (diffusers' TaylorSeer schedule; latentpatch.sampling.caches.schedule). Heun makes 2 calls a step.
METHODS: dict[str, Method] = {
    # diffusers' TaylorSeer hook on each block's attention and MLP: reuse (order 0) or extrapolate their outputs.
    # interval 3: the measured best trade (docs/benchmarks.md, "Sampling caches": 1.73x in a 64-image job, FID and
    # SWD within a few %; interval 4 reaches 1.95x but tints dark areas, SWD +9.5%)
    "step": Method("DiTs, SD3 / FLUX", (Setting("interval", int, 3, 1), Setting("order", int, 1, 0, 2),
                            Setting("warmup", int, 3, 1))),
    # DeepCache: the UNet's deep path (below `level`) reused, the shallow levels recomputed every call.
    "deepcache": Method("UNets", (Setting("interval", int, 3, 1), Setting("level", int, 0, 0),
                                  Setting("warmup", int, 1, 1))),
    # Region-adaptive sampling: a `ratio` share of each image's tokens updated per cached call, the rest reused.
    "ras": Method("DiTs", (Setting("ratio", float, 0.5, 0.0, 1.0, low_open=True), Setting("interval", int, 4, 1),
                           Setting("warmup", int, 2, 2))),
}
OFF = ("none", "off")


@dataclass(frozen=True)
class CacheSpec:
    method: str
    settings: dict[str, Any]

    @property
    def text(self) -> str:
        """The canonical spelling, as job.json records it."""
        return self.method + ":" + ",".join(f"{k}={v:g}" for k, v in self.settings.items())


def parse_cache(text: str) -> CacheSpec:
    """METHOD[:name=value,...] -> CacheSpec with every setting; a UserError naming what is wrong."""
    if not isinstance(text, str) or not text.strip():
        raise UserError(f"--cache must be a method name ({', '.join(METHODS)}) with optional settings, got {text!r}")
    name, _, rest = text.strip().partition(":")
    method = METHODS.get(name)
    if method is None:
        raise UserError(f"--cache: unknown method {name!r}; the methods are {', '.join(METHODS)} "
                        f"(e.g. --cache ras:ratio=0.5,interval=4), or none")
    known = {s.name: s for s in method.settings}
    given: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or key.strip() not in known:
            raise UserError(f"--cache {name}: {item!r} is not a setting; {name} takes "
                            f"{', '.join(f'{s.name}=' for s in method.settings)} (defaults: {_defaults(method)})")
        given[key.strip()] = value.strip()
    return CacheSpec(name, {s.name: s.parse(name, given[s.name]) if s.name in given else s.default
                            for s in method.settings})


def canonical_cache(value: Any) -> Any:
    """The canonical text of a cache option, None for off; a value that does not parse is kept for the check."""
    if value is None or (isinstance(value, str) and value.strip().lower() in OFF):
        return None
    try:
        return parse_cache(value).text
    except UserError:
        return value


def _defaults(method: Method) -> str:
    return ",".join(f"{s.name}={s.default:g}" for s in method.settings)


def cache_help() -> str:
    methods = "; ".join(f"{name} ({m.networks}: {_defaults(m)})" for name, m in METHODS.items())
    return ("Reuse work between network calls (off by default): METHOD[:name=value,...], e.g. ras:ratio=0.5. "
            f"Methods and defaults: {methods}. After `warmup` full calls one call in `interval` runs the whole "
            "network (Heun makes 2 calls a step). Recorded in job.json and each PNG; docs/benchmarks.md has the "
            "measured speed and quality of each.")
