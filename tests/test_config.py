"""Configs: presets by name, `base:` inheritance, overrides, and errors that name the bad key."""

import pytest

from latentpatch.config import (
    RunConfig,
    config_from_dict,
    config_to_dict,
    load_config,
    parse_overrides,
    save_config,
)
from latentpatch.errors import UserError


def test_defaults_follow_the_papers():
    cfg = RunConfig()
    assert (cfg.edm.P_mean, cfg.edm.P_std) == (-1.2, 1.2)
    assert cfg.edm.sigma_data is None  # the latent store's measured std, not EDM's 0.5 for pixels
    assert cfg.patches.real_p == 0.5 and cfg.patches.sizes == [0.5]


def test_overrides_parse_values_as_yaml():
    assert parse_overrides(["train.max_steps=10", "patches.sizes=[0.25, 0.5]", "model.dit.preset=DiT-S/2"]) == {
        "train": {"max_steps": 10},
        "patches": {"sizes": [0.25, 0.5]},
        "model": {"dit": {"preset": "DiT-S/2"}},
    }
    cfg = load_config(None, ["train.max_steps=10", "optim.lr=3e-4", "patches.real_p=1"])
    assert cfg.train.max_steps == 10 and cfg.optim.lr == 3e-4
    assert cfg.patches.real_p == 1.0 and isinstance(cfg.patches.real_p, float)


def test_unknown_key_is_named_in_the_error():
    with pytest.raises(UserError, match=r"unknown config key model\.hiden_size"):
        load_config(None, ["model.hiden_size=64"])
    with pytest.raises(UserError, match=r"unknown config key trian"):
        config_from_dict({"trian": {}})


def test_wrong_type_is_named_in_the_error():
    with pytest.raises(UserError, match=r"train\.max_steps: expected int"):
        load_config(None, ["train.max_steps=ten"])
    with pytest.raises(UserError, match=r"must look like section.key=value"):
        parse_overrides(["train.max_steps"])


def test_yaml_file_with_base_and_round_trip(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("model:\n  dit:\n    hidden_size: 64\n    num_heads: 2\n    depth: 2\ntrain:\n  batch_size: 4\n")
    child = tmp_path / "child.yaml"
    child.write_text(f"base: {base}\ntrain:\n  max_steps: 7\n")
    cfg = load_config(child)
    assert (cfg.model.dit.hidden_size, cfg.model.dit.depth, cfg.train.batch_size, cfg.train.max_steps) == (64, 2, 4, 7)
    save_config(cfg, tmp_path / "resolved.yaml")
    again = load_config(tmp_path / "resolved.yaml")
    assert config_to_dict(again) == config_to_dict(cfg)


def test_missing_preset_lists_the_builtin_ones():
    with pytest.raises(UserError, match="unknown config 'no-such-preset'"):
        load_config("no-such-preset")
    with pytest.raises(UserError, match="config file not found"):
        load_config("missing.yaml")


def test_a_run_config_written_before_the_per_architecture_sections_still_loads(tmp_path):
    """latentpatch 0.1 wrote a flat model section (hidden_size, unet_*, unet_config); it maps onto today's."""
    old = tmp_path / "config.yaml"
    old.write_text("model:\n  arch: dit\n  preset: null\n  hidden_size: 64\n  depth: 2\n  num_heads: 2\n"
                   "  patch_size: 2\n  mlp_ratio: 4.0\n  unet_block_out_channels: [32, 64]\n"
                   "  unet_layers_per_block: 1\n  unet_attention_levels: [false, true]\n"
                   "  unet_attention_head_dim: 8\n  unet_config: null\n")
    cfg = load_config(old)
    assert (cfg.model.dit.hidden_size, cfg.model.dit.depth, cfg.model.dit.num_heads) == (64, 2, 2)
    assert cfg.model.unet.block_out_channels == [32, 64] and cfg.model.arch == "dit"
    old.write_text("model:\n  arch: unet\n  unet_config: {_class_name: UNet2DModel, in_channels: 6}\n")
    cfg = load_config(old)
    assert cfg.model.arch == "pretrained" and cfg.model.pretrained.class_name == "UNet2DModel"
    assert cfg.model.pretrained.config["in_channels"] == 6


def test_patch_schedule_typos_are_refused_not_trained_silently():
    with pytest.raises(UserError, match="size_weights has 3 entries for the 2 of patches.sizes"):
        load_config(None, ["patches.sizes=[0.25, 0.5]", "patches.size_weights=[1, 2, 3]"])
    with pytest.raises(UserError, match="patches.real_p=1 trains on full-size latents only"):
        load_config(None, ["patches.real_p=1", "patches.sizes=[0.25]"])
    with pytest.raises(UserError, match="patches.sizes is empty"):
        load_config(None, ["patches.sizes=[]"])
    assert load_config("full-size").patches.sizes == []


def test_zero_max_steps_is_refused():
    with pytest.raises(UserError, match="train.max_steps must be at least 1"):
        load_config("tiny", ["train.max_steps=0"])
