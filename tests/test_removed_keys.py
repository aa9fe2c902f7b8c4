"""Keys that left the config (docs/configuration.md, "Removed keys") and the coordinate grid of old run folders."""

import pytest
import yaml

from latentpatch.config import REMOVED_KEYS, RunConfig, config_to_dict, load_config, load_saved_config
from latentpatch.errors import UserError


def _saved(tmp_path, **changes):
    """A config.yaml as a run of latentpatch 0.1 wrote it: every key, the removed ones at their defaults."""
    data = config_to_dict(RunConfig())
    for key, (default, _) in REMOVED_KEYS.items():
        section, name = key.split(".")
        data[section][name] = default
    del data["patches"]["coordinate_scale"]  # older still: saved before the key existed
    for key, value in changes.items():
        section, name = key.split(".")
        data[section][name] = value
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_an_old_run_config_naming_every_removed_key_at_its_default_still_loads(tmp_path):
    cfg = load_saved_config(_saved(tmp_path))
    assert "snr_cap" not in config_to_dict(cfg)["edm"] and "sigma_overlap" not in config_to_dict(cfg)["patches"]


@pytest.mark.parametrize("key, value", [("edm.snr_cap", 5.0), ("patches.sigma_overlap", 0.5),
                                        ("patches.loss_weighting", "area"), ("train.ema_count", "samples"),
                                        ("patches.progressive_steps", 100), ("patches.coordinates", "local"),
                                        ("patches.sigma_order", "crops-high"), ("routing.until_step", 50)])
def test_a_run_that_used_a_removed_key_is_refused_in_one_line_naming_it(tmp_path, key, value):
    with pytest.raises(UserError) as e:
        load_saved_config(_saved(tmp_path, **{key: value}))
    message = str(e.value)
    assert "\n" not in message and key in message and "removed in latentpatch 0.2" in message
    with pytest.raises(UserError, match="removed"):  # an override too
        load_config("tiny", [f"{key}={value}"])


def test_a_run_saved_before_the_coordinate_scale_key_keeps_the_per_axis_grid(tmp_path):
    assert load_saved_config(_saved(tmp_path)).patches.coordinate_scale == "per-axis"
    assert load_config("tiny").patches.coordinate_scale == "longer-side"  # a new run
    saved = _saved(tmp_path, **{"patches.coordinate_scale": "longer-side"})
    assert load_saved_config(saved).patches.coordinate_scale == "longer-side"
