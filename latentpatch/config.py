"""Dataclass configs, YAML presets found by name, and `key=value` overrides.

Unknown keys are an error that names the key, so a typo never silently trains the wrong model.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

# EDMConfig, ModelConfig and its sections are re-exported: each config lives beside the code it configures.
from latentpatch.diffusion.edm import EDMConfig
from latentpatch.errors import UserError
from latentpatch.models.model_config import DiTConfig, ModelConfig, UNetConfig, migrate_legacy  # noqa: F401
from latentpatch.models.presets import preset_values

COORDINATE_MODES = ("absolute", "local")
PRECISIONS = ("auto", "bf16", "fp32")


@dataclass
class PatchConfig:
    """Patch schedule (Wang et al. 2023): the full size gets real_p; smaller sides are fractions of it."""

    real_p: float = 0.5
    sizes: list[float] = field(default_factory=lambda: [0.5])
    size_weights: list[float] | None = None  # one relative weight per entry of sizes (None: equal)
    batch_growth: float = 2.0
    progressive_steps: int = 0
    coordinates: str = "absolute"  # "absolute" (the paper) | "local" (ablation: no location information)

    def __post_init__(self) -> None:
        if self.real_p == 1.0 and self.sizes == PatchConfig.__dataclass_fields__["sizes"].default_factory():
            self.sizes = []  # full-size only: the default sides are not in use (ones given are refused by check)

    def check(self) -> None:
        if not 0.0 <= self.real_p <= 1.0:
            raise UserError(f"patches.real_p must be in [0, 1], got {self.real_p}")
        if self.real_p == 1.0 and self.sizes:
            raise UserError(f"patches.real_p=1 trains on full-size latents only, so patches.sizes {self.sizes} would "
                            "never be used; set patches.sizes=[] too (as the full-size preset does), or real_p < 1")
        if self.real_p < 1.0 and not self.sizes:
            raise UserError(f"patches.real_p={self.real_p} leaves {1 - self.real_p:g} of the steps to patches, but "
                            "patches.sizes is empty; give the patch sides, e.g. patches.sizes=[0.5]")
        if any(not 0.0 < s < 1.0 for s in self.sizes):
            raise UserError(f"patches.sizes are fractions of the latent side in (0, 1), got {self.sizes}")
        if self.size_weights is not None:
            if len(self.size_weights) != len(self.sizes):
                raise UserError(f"patches.size_weights has {len(self.size_weights)} entries for the "
                                f"{len(self.sizes)} of patches.sizes {self.sizes}; give one weight per size")
            if any(w < 0 for w in self.size_weights) or sum(self.size_weights) <= 0:
                raise UserError(f"patches.size_weights must be >= 0 with a positive sum, got {self.size_weights}")
        if self.coordinates not in COORDINATE_MODES:
            raise UserError(f"patches.coordinates must be one of {COORDINATE_MODES}, got {self.coordinates!r}")
        if self.batch_growth <= 0 or self.progressive_steps < 0:
            raise UserError("patches.batch_growth must be > 0 and patches.progressive_steps >= 0")


@dataclass
class OptimConfig:
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    eps: float = 1e-8
    warmup_steps: int = 1000
    grad_clip: float = 1.0

    def check(self) -> None:
        if len(self.betas) != 2:
            raise UserError(f"optim.betas needs two values, got {self.betas}")
        if not self.lr >= 0:
            raise UserError(f"optim.lr must be >= 0, got {self.lr}")


@dataclass
class TrainConfig:
    batch_size: int = 64  # per optimisation step at full size, over all ranks
    grad_accum: int = 1
    max_steps: int = 100_000
    seed: int = 0
    precision: str = "auto"  # "auto" (bf16 on CUDA, fp32 on CPU) | "bf16" | "fp32"
    compile: bool = False
    ema_halflife_kimg: float = 500.0
    ema_rampup: float | None = 0.05
    label_dropout: float = 0.1
    log_every: int = 50
    ckpt_every: int = 1000
    keep_checkpoints: int = 3
    sample_every: int = 0
    sample_n: int = 16
    sample_steps: int = 18

    def check(self) -> None:
        """Values no type check catches; each message names the key."""
        for key in ("batch_size", "grad_accum", "log_every", "ckpt_every", "max_steps"):
            if getattr(self, key) < 1:
                raise UserError(f"train.{key} must be at least 1, got {getattr(self, key)}")
        if not 0.0 <= self.label_dropout <= 1.0:
            raise UserError(f"train.label_dropout must be in [0, 1], got {self.label_dropout}")
        if self.precision not in PRECISIONS:
            raise UserError(f"train.precision must be one of {PRECISIONS}, got {self.precision!r}")


@dataclass
class TextConfig:
    """Frozen open-clip text encoder (latentpatch.text); empty model means no text conditioning, unless the
    latent store holds cached text embeddings, whose encoder is then used ("none" trains without text)."""

    model: str = ""                 # open_clip name (ViT-B-32) or a model config .json file
    pretrained: str | None = None   # tag (laion2b_s34b_b79k), checkpoint file, or None: random weights
    caption_dropout: float = 0.1    # P(caption -> ""), which trains the unconditional model for guidance
    max_length: int = 77            # tokens kept for cross-attention (at most the model's context length)
    pooled: bool = True             # also feed the pooled embedding (adaLN / the UNet's time embedding)

    def check(self) -> None:
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise UserError(f"text.caption_dropout must be in [0, 1], got {self.caption_dropout}")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    edm: EDMConfig = field(default_factory=EDMConfig)
    patches: PatchConfig = field(default_factory=PatchConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    text: TextConfig = field(default_factory=TextConfig)

    def check(self) -> RunConfig:
        """Every check that needs no data, once, when the config is loaded; returns self."""
        for section in (self.model, self.edm, self.patches, self.optim, self.train, self.text):
            section.check()
        return self


def builtin_config_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("latentpatch.configs").iterdir() if p.name.endswith(".yaml"))


def _read_yaml(name_or_path: str | Path) -> tuple[dict, str]:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise UserError(f"config file not found: {path}")
        text, where = path.read_text(), str(path)
    else:
        res = resources.files("latentpatch.configs").joinpath(f"{name_or_path}.yaml")
        if not res.is_file():
            raise UserError(
                f"unknown config {name_or_path!r}: not a file and not a built-in preset "
                f"({', '.join(builtin_config_names())})"
            )
        text, where = res.read_text(), f"built-in preset {name_or_path}"
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{where} is not valid YAML: {' '.join(str(e).split())}") from e  # one line
    if not isinstance(data, dict):
        raise UserError(f"{where} must hold a mapping of sections (model, patches, train, ...)")
    return data, where


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _load_tree(name_or_path: str | Path, seen: tuple[str, ...] = ()) -> dict:
    """A preset may name `base: OTHER` and override only what differs."""
    data, where = _read_yaml(name_or_path)
    base = data.pop("base", None)
    if base is None:
        return data
    if str(base) in seen:
        raise UserError(f"config {where} has a cycle of `base:` presets: {' -> '.join(seen + (str(base),))}")
    return _deep_merge(_load_tree(str(base), seen + (str(base),)), data)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check a YAML value against a field's type; ints become floats, nothing else is guessed."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except UserError:
                continue
        raise UserError(f"config key {key}: {value!r} is not a {tp}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise UserError(f"config key {key}: expected a list, got {value!r}")
        (inner, *_) = typing.get_args(tp) or (Any,)
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads 3e-4 (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is bool and isinstance(value, bool):
        return value
    if tp is str and isinstance(value, str):
        return value
    if tp is Any:
        return value
    raise UserError(f"config key {key}: expected {getattr(tp, '__name__', tp)}, got {value!r}")


def _build(cls: type, data: dict, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise UserError(f"config section {prefix.rstrip('.') or 'root'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise UserError(
            f"unknown config key{'s' if len(unknown) > 1 else ''} {', '.join(prefix + k for k in unknown)}; "
            f"valid keys in {prefix.rstrip('.') or 'the root'}: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for k, v in data.items():
        tp = hints[k]
        if dataclasses.is_dataclass(tp):
            kwargs[k] = _build(tp, v, f"{prefix}{k}.")
        else:
            kwargs[k] = _coerce(v, tp, prefix + k)
    return cls(**kwargs)


def parse_overrides(overrides: list[str]) -> dict:
    """`a.b=value` strings into a nested dict; values are parsed as YAML (so 0.5, true, [1, 2] work)."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override {item!r} must look like section.key=value (e.g. train.max_steps=100)")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise UserError(f"override {item!r}: cannot parse the value: {e}") from e
        node = tree
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return tree


def _check_patch_sizes(data: dict) -> None:
    """Patch sides given beside real_p 1 would never be used: a typo, refused (the default sides are dropped)."""
    patches = data.get("patches") or {}
    if isinstance(patches, dict) and patches.get("real_p") == 1 and patches.get("sizes"):
        raise UserError(f"patches.real_p=1 trains on full-size latents only, so patches.sizes {patches['sizes']} would "
                        "never be used; set patches.sizes=[] too (as the full-size preset does), or real_p < 1")


def _check_preset_fields(data: dict) -> None:
    """A DiT field set beside model.dit.preset must agree with it (the preset fills the rest)."""
    dit = (data.get("model") or {}).get("dit") or {}
    if not isinstance(dit, dict) or not dit.get("preset"):
        return
    for name, value in preset_values(dit["preset"]).items():
        if name in dit and dit[name] != value:
            raise UserError(f"model.dit.preset {dit['preset']} has {name} {value}, but model.dit.{name} is {dit[name]}; "
                            "drop one of them (or set model.dit.preset=null to size the DiT by hand)")


def config_from_dict(data: dict) -> RunConfig:
    """A checked RunConfig from a nested dict (a flat model section of older runs is read too)."""
    if isinstance(data.get("model"), dict):
        data = {**data, "model": migrate_legacy(data["model"])}
    _check_preset_fields(data)
    _check_patch_sizes(data)
    return _build(RunConfig, data, "").check()


def load_config(name_or_path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """A preset by name (configs/NAME.yaml) or a YAML file, then overrides, into a checked RunConfig."""
    data = _load_tree(name_or_path) if name_or_path else {}
    data = _deep_merge(data, parse_overrides(overrides or []))
    return config_from_dict(data)


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def apply_overrides(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    """A checked copy of `cfg` with `section.key=value` overrides applied."""
    return config_from_dict(_deep_merge(config_to_dict(cfg), parse_overrides(overrides)))


def save_config(cfg: RunConfig, path: str | Path) -> None:
    from latentpatch.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
