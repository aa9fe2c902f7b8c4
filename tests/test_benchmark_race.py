"""The race report both speed studies share (benchmarks/speed/race.py), on run logs written here."""

import json

from benchmarks.speed.race import Race, race_section, results_json


def write_run(folder, losses, every=50.0, step_per_s=2):
    """A run's log: held-out evaluations at every `every` training-s (per-sigma losses: half and twice the loss),
    a training record between them, and one evaluation past the budget that the race must not see."""
    folder.mkdir(parents=True)
    lines = []
    for i, loss in enumerate(losses, start=1):
        t = i * every
        lines.append({"step": int(t * step_per_s) - 1, "loss": 1.0, "train_s": t - 1})
        lines.append({"step": int(t * step_per_s), "train_s": t, "heldout_loss": loss,
                      "heldout_per_sigma": [loss / 2, 2 * loss], "time": 0.0})
    (folder / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))


def test_the_race_reads_each_run_to_its_budget_times_the_crossing_and_keys_seeds_for_json(tmp_path):
    # full size reaches its best (0.4) at 200 s; the patch arm gets there at 100 s in seed 0 (2x sooner) and
    # halfway between its 100-s and 150-s evaluations in seed 1 (0.5 -> 0.3: 125 s, 1.6x); never mind what
    # either does past the 200-s budget (0.0 at 250 s)
    curves = {("full-size", 0): [0.8, 0.6, 0.5, 0.4, 0.0], ("full-size", 1): [0.8, 0.6, 0.5, 0.4, 0.0],
              ("half-crops", 0): [0.6, 0.4, 0.35, 0.3, 0.0], ("half-crops", 1): [0.7, 0.5, 0.3, 0.3, 0.0]}
    runs = {key: tmp_path / "runs" / key[0] / f"seed{key[1]}" for key in curves}
    for key, losses in curves.items():
        write_run(runs[key], losses)
    race = Race(runs, ["full-size", "half-crops"], [0, 1], 200.0, 50.0, "full-size", "a race")
    md, found = race_section(race, [0.1, 1.0], tmp_path / "figs" / "r", samples=None)

    assert [t for t, _ in found["curves"]["full-size"][0]] == [50, 100, 150, 200]  # the 250-s evaluation cut
    assert found["steps"] == {"full-size": {0: 400, 1: 400}, "half-crops": {0: 400, 1: 400}}
    ups = found["speedups"]["half-crops"]
    assert ups[0]["arm_s"] == 100 and ups[0]["ratio"] == 2.0
    assert abs(ups[1]["arm_s"] - 125) < 1e-9 and abs(ups[1]["ratio"] - 1.6) < 1e-9
    assert found["summary"]["half-crops"][1] == {"best": 0.3, "best_s": 150, "final": 0.3, "end_s": 200,
                                                  "at_half": 0.5}
    assert md.startswith("a race\n\n") and "| half-crops | 400 | 0.3000 (0.3000-0.3000) |" in md
    assert "1.80 (1.60-2.00)" in md  # x sooner: mean (min-max) over the seeds
    for figure in ("r-curves.png", "r-sigmas.png"):
        assert (tmp_path / "figs" / figure).stat().st_size > 0
    assert not (tmp_path / "figs" / "r-grids.png").exists()  # no samples, no grid

    saved = json.loads(json.dumps(results_json(race, [0.1, 1.0], found)))
    assert saved["speedups"]["half-crops"]["0"]["ratio"] == 2.0
    assert saved["evaluations"]["half-crops"]["1"][0] == {"step": 100, "train_s": 50.0, "heldout_loss": 0.7,
                                                          "heldout_per_sigma": [0.35, 1.4]}
    assert saved["sigma_curves"]["full-size"]["0"][-1] == [200.0, [0.2, 0.8]]
