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

# Each section lives beside the code it configures; all are re-exported here.
from latentpatch.diffusion.ddpm import VPConfig
from latentpatch.diffusion.edm import EDMConfig
from latentpatch.diffusion.flow import FlowConfig
from latentpatch.errors import UserError
from latentpatch.models.model_config import DiTConfig, ModelConfig, UNetConfig, migrate_legacy  # noqa: F401
from latentpatch.patches import PatchConfig
from latentpatch.text.config import TextConfig
from latentpatch.train_config import HeldoutConfig, OptimConfig, RoutingConfig, TrainConfig


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    edm: EDMConfig = field(default_factory=EDMConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)  # the objective of a flow-matching base (edm.precond=flow)
    vp: VPConfig = field(default_factory=VPConfig)  # the objective of a DDPM base (edm.precond=vp)
    patches: PatchConfig = field(default_factory=PatchConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    heldout: HeldoutConfig = field(default_factory=HeldoutConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    text: TextConfig = field(default_factory=TextConfig)

    def check(self) -> RunConfig:
        """Every check that needs no data, once, when the config is loaded; returns self."""
        for section in (self.model, self.edm, self.flow, self.vp, self.patches, self.optim, self.train, self.heldout,
                        self.routing, self.text):
            section.check()
        if self.edm.precond == "flow" and (not self.patches.aligned or self.patches.coordinate_scale != "per-axis"):
            raise UserError("a flow-matching base (edm.precond=flow) reads each crop's place on its token grid from "
                            "per-axis coordinates: set patches.aligned=true and patches.coordinate_scale=per-axis")
        if self.vp.objective == "ddpm" and self.edm.precond != "vp":
            raise UserError(f"vp.objective=ddpm trains a DDPM base's own prediction; it needs edm.precond=vp (got "
                            f"{self.edm.precond})")
        self._check_sdxl()
        if self.routing.share > 0:
            if self.model.arch != "dit":
                raise UserError(f"routing.share={self.routing.share} routes DiT tokens; model.arch={self.model.arch} "
                                "has none (set routing.share=0)")
            self.routing.blocks(self.model.dit.depth)
        return self


    def _check_sdxl(self) -> None:
        """An SDXL UNet reads each crop's place (offset, full size) back from per-axis coordinates."""
        from latentpatch.models.sdxl import is_sdxl_unet

        if self.model.arch != "pretrained" or not is_sdxl_unet(self.model.pretrained.config):
            return
        if self.patches.coordinate_scale != "per-axis":
            raise UserError("an SDXL base reads each crop's offset and its image's size from per-axis coordinates: set "
                            "patches.coordinate_scale=per-axis")
        if self.model.pretrained.vae_scale_factor < 1:
            raise UserError("an SDXL base needs model.pretrained.vae_scale_factor (its VAE's pixels per latent pixel): "
                            "its micro-conditioning is in pixels")


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
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise UserError(f"{where} is not valid YAML: {' '.join(str(e).split())}") from e  # one line
    if data is None or data == {}:  # else it would train the library defaults without a word
        raise UserError(f"config {where} is empty; write the settings in it (or `base: PRESET` to start from a "
                        f"preset: {', '.join(builtin_config_names())}), or pass a preset name to --config")
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


# Keys removed in latentpatch 0.2 (switches that never paid or were never trained; docs/configuration.md lists the
# evidence): each one's old default and what it did. Every saved config.yaml names them all, so one at its old
# default (which changes nothing) is dropped; any other value is refused, since no code does it any more.
REMOVED_KEYS: dict[str, tuple[Any, str]] = {
    "edm.snr_cap": (None, "capped the training loss weight (min-SNR) and never reached full size's best"),
    "patches.sigma_overlap": (1.0, "tied each patch size to a slice of the noise levels and gained nothing"),
    "patches.sigma_order": ("crops-low", "ordered that tie of patch sizes to noise levels"),
    "patches.loss_weighting": ("mean", "weighted a step's loss by its patch area and was never trained to a result"),
    "patches.progressive_steps": (0, "ran the patch sizes smallest-first and was never trained to a result"),
    "patches.coordinates": ("absolute", "gave every crop a whole image's grid, an ablation that never paid"),
    "train.ema_count": ("images", "counted every patch as an image for the EMA and was never trained to a result"),
    "routing.until_step": (0, "ended token routing at a step and was never trained to a result"),
}


def _without_removed(data: dict) -> dict:
    """`data` without the removed keys at their old defaults; a removed key set otherwise is refused."""
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for key, (default, what) in REMOVED_KEYS.items():
        section, name = key.split(".")
        if not isinstance(data.get(section), dict) or name not in data[section]:
            continue
        value = data[section].pop(name)
        if value != default:
            raise UserError(f"config key {key}={value!r}: it {what}, and was removed in latentpatch 0.2; drop the "
                            "key (a run trained with it cannot be resumed or loaded by this version)")
    return data


def config_from_dict(data: dict) -> RunConfig:
    """A checked RunConfig from a nested dict (a flat model section of older runs is read too)."""
    if isinstance(data.get("model"), dict):
        data = {**data, "model": migrate_legacy(data["model"])}
    return _build(RunConfig, _without_removed(data), "").check()


def load_saved_config(path: str | Path) -> RunConfig:
    """A run folder's config.yaml. One saved before patches.coordinate_scale existed trained on the per-axis
    grid, so it reads as per-axis (new runs default to longer-side): resumes and samples keep their grid."""
    data, _ = _read_yaml(path)
    if isinstance(data.get("patches"), dict) and "coordinate_scale" not in data["patches"]:
        data["patches"] = {**data["patches"], "coordinate_scale": "per-axis"}
    return config_from_dict(data)


def load_config(name_or_path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """A preset by name (configs/NAME.yaml) or a YAML file, then overrides, into a checked RunConfig."""
    data = _load_tree(name_or_path) if name_or_path else {}
    data = _deep_merge(data, parse_overrides(overrides or []))
    return config_from_dict(data)


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): tree}


def differences(a: dict, b: dict, ignore: tuple[str, ...] = ()) -> list[str]:
    """The dotted keys of two (nested) settings dicts whose values differ, as 'key: a -> b' (a resume's check)."""
    fa, fb = _flatten(a), _flatten(b)
    return [f"{k}: {fa.get(k)!r} -> {fb.get(k)!r}" for k in sorted(set(fa) | set(fb))
            if k not in ignore and fa.get(k) != fb.get(k)]


def apply_overrides(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    """A checked copy of `cfg` with `section.key=value` overrides applied."""
    return config_from_dict(_deep_merge(config_to_dict(cfg), parse_overrides(overrides)))


def save_config(cfg: RunConfig, path: str | Path) -> None:
    from latentpatch.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
