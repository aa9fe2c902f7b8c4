"""Speed to quality's arms under their new names train exactly what they trained under their old ones, so the
runs and step times of a result folder written before the rename are reused, renamed once."""

import json
from pathlib import Path

from latentpatch.config import config_to_dict

from benchmarks.speed import arms, renames

# The arms as they were recorded (before the rename), less COMMON's entries for keys since removed from the
# library, which every arm below left at their defaults.
OLD_COMMON = [o for o in arms.COMMON if o != "patches.aligned=false"] + ["patches.aligned=true"]
OLD_FULL = ["patches.real_p=1", "patches.sizes=[]"]
OLD_PAPER = ["patches.aligned=false", "edm.sigma_data=0.5"]
OLD_ROUTING = ["routing.share=0.5", "routing.start=1", "routing.end=2"]
OLD_PHEMA = ["train.posthoc_stds=[0.05, 0.1]", "train.posthoc_every=EVAL"]
OLD_ARMS = {
    "full-size": OLD_FULL, "full-size/sd0.5": OLD_FULL + ["edm.sigma_data=0.5"], "paper": OLD_PAPER,
    "paper+aligned": ["edm.sigma_data=0.5"], "paper+sigma": ["patches.aligned=false"], "corrected": [],
    "corrected/real_p0.25": ["patches.real_p=0.25"],
    "corrected/quarter": ["patches.sizes=[0.25, 0.5]", "patches.size_weights=[2, 3]"],
    "corrected+routing": OLD_ROUTING,
    "paper+sigma/quarter": ["patches.aligned=false", "patches.sizes=[0.25, 0.5]", "patches.size_weights=[2, 3]"],
    "paper+sigma/real_p0.25": ["patches.aligned=false", "patches.real_p=0.25"],
    "full-size+phema": OLD_FULL + OLD_PHEMA, "paper+sigma+phema": ["patches.aligned=false"] + OLD_PHEMA,
    "routing": OLD_FULL + OLD_ROUTING,
    "paper+sigma+zoom": ["patches.aligned=false", "patches.zoom_p=0.25", "patches.zoom_latents=ZOOM"],
}
DATA = {"heldout": Path("held"), "train": Path("train"), "zoom": Path("zoom")}


def _old_config(arm: str):
    from latentpatch.config import load_config

    over = [o.replace("EVAL", "100").replace("ZOOM", "zoom") for o in OLD_ARMS[arm]]
    return load_config(None, OLD_COMMON + over + ["model.num_classes=0", "train.seed=3", "heldout.latents=held",
                                                  "heldout.every=100"])


def test_every_old_arm_is_an_arm_of_the_same_config_under_its_new_name():
    for old in OLD_ARMS:
        new = renames.RENAMED.get(old, old)
        assert new in arms.ARMS, old
        was, now = config_to_dict(_old_config(old)), config_to_dict(arms.arm_config(new, 3, DATA, 100, "faces80"))
        if was["patches"]["real_p"] == 1:  # no crop is ever placed: where crops would sit changes no draw
            assert was["patches"].pop("aligned") and not now["patches"].pop("aligned")
        assert was == now, (old, new)


def test_names_are_renamed_once_and_removed_arms_are_gone():
    assert set(renames.RENAMED.values()) <= set(arms.ARMS)
    assert not set(renames.RENAMED) & set(arms.ARMS)  # an old name is no arm: a rename never chains
    assert not set(renames.REMOVED) & (set(arms.ARMS) | set(renames.RENAMED))
    removed_keys = set(renames.REMOVED.values()) | {"patches.sigma_order", "routing.until_step"}
    assert not [o for o in arms.COMMON + sum(arms.ARMS.values(), []) if o.split("=")[0] in removed_keys]
    assert renames.unknown_arm_hint("paper+sigma") == "paper+sigma is now called half-crops"
    assert renames.unknown_arm_hint("paper+sigma+snr5") == "paper+sigma+snr5 was removed with edm.snr_cap"


def test_an_old_result_folder_is_renamed_once_and_a_new_name_already_there_wins(tmp_path):
    (tmp_path / "step_times.json").write_text(json.dumps({"paper+sigma": [[[8, 8, 32, False], 0.5]],
                                                          "corrected": [[[8, 8, 32, False], 0.25]],
                                                          "half-crops/aligned": [[[8, 8, 32, False], 0.75]],
                                                          "paper+sigma+snr5": [[[8, 8, 32, False], 1.0]]}))
    runs = tmp_path / "runs"
    for folder in ("paper+sigma_real_p0.25", "routing", "half-crops_zoom", "paper+sigma+zoom"):
        (runs / folder / "seed0").mkdir(parents=True)
    assert renames.rename_step_times(tmp_path) == ["step_times.json: paper+sigma -> half-crops"]
    assert json.loads((tmp_path / "step_times.json").read_text()) == {
        "half-crops": [[[8, 8, 32, False], 0.5]], "corrected": [[[8, 8, 32, False], 0.25]],
        "half-crops/aligned": [[[8, 8, 32, False], 0.75]], "paper+sigma+snr5": [[[8, 8, 32, False], 1.0]]}
    renamed = renames.rename_folders(runs, renames.folder_name)
    assert len(renamed) == 2
    assert sorted(p.name for p in runs.iterdir()) == ["full-size_routing", "half-crops_real_p0.25", "half-crops_zoom",
                                                     "paper+sigma+zoom"]  # half-crops_zoom was there: kept as is
    assert (runs / "half-crops_real_p0.25" / "seed0").is_dir()
    assert renames.rename_step_times(tmp_path) == [] and renames.rename_folders(runs, renames.folder_name) == []
