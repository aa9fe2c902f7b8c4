"""Speed to quality on each run's own training time: the callback that evaluates on a grid of training seconds
and stops at the budget (benchmarks.speed.timed_run), the trainer obeying it, and reading the runs back."""

import pytest
from trainer_helpers import make_store, photo_crops, tiny_overrides

from latentpatch.config import load_config
from latentpatch.training.logging import read_log
from latentpatch.training.results import EVALUATE, StepInfo
from latentpatch.training.trainer import train

from benchmarks.speed.timed_run import TimeGrid
from benchmarks.speed.training import within_budget


def info(seconds: float) -> StepInfo:
    return StepInfo(1, 0.0, None, (8, 8), 4, seconds, None, None)


def test_the_grid_asks_for_an_evaluation_once_per_multiple_of_its_interval_and_stops_at_the_budget():
    grid = TimeGrid(budget=10.0, every=3.0)
    asked = [grid(info(t)) for t in (0.5, 2.9, 3.0, 3.5, 5.0, 6.4, 9.5, 9.9, 10.2)]
    # 3.0 reaches the first point; 6.4 the second; a step from 5.0 to 9.5 crosses 6 and 9 but asks once.
    assert asked == [None, None, EVALUATE, None, None, EVALUATE, EVALUATE, None, True]
    assert grid.next == 12.0


def test_a_resumed_run_continues_its_grid_from_its_clock():
    grid = TimeGrid(budget=20.0, every=4.0)
    assert grid(info(9.0)) is None and grid.next == 12.0  # the points before 9 s were the first process's
    assert grid(info(12.1)) == EVALUATE


def test_the_trainer_evaluates_when_the_callback_asks_and_after_the_stopping_step(tmp_path):
    store = make_store(tmp_path / "train", photo_crops(24, 16, seed=0)[:20])
    held = make_store(tmp_path / "held", photo_crops(24, 16, seed=0)[20:])
    cfg = load_config("tiny", tiny_overrides(**{"heldout.latents": str(held), "heldout.every": 10**9,
                                                "heldout.sigmas": 2, "train.max_steps": 50}))
    answers = {3: EVALUATE, 4: None, 7: EVALUATE, 9: True}
    seen = []

    def callback(step_info):
        seen.append(step_info.train_seconds)
        return answers.get(step_info.step)

    result = train(cfg, store, tmp_path / "run", progress=False, device="cpu", callback=callback)
    held_steps = [r["step"] for r in read_log(tmp_path / "run" / "log.jsonl") if "heldout_loss" in r]
    assert held_steps == [0, 3, 7, 9] and result.step == 9
    train_s = {r["step"]: r["train_s"] for r in read_log(tmp_path / "run" / "log.jsonl") if "heldout_loss" in r}
    assert train_s[3] == pytest.approx(seen[2]) and train_s[9] == pytest.approx(seen[8])  # the callback's clock
    assert train_s[0] == 0.0 and 0 < train_s[3] < train_s[7] < train_s[9]


def test_records_within_a_budget_end_at_the_first_past_it_and_count_a_resumed_step_once():
    records = [{"step": 0, "train_s": 0.0, "x": 1}, {"step": 5, "train_s": 3.1, "x": 2},
               {"step": 9, "train_s": 6.2, "x": 3}, {"step": 9, "train_s": 6.2, "x": 4},  # resumed: logged again
               {"step": 12, "train_s": 8.0, "x": 5}, {"step": 14, "train_s": 9.5, "x": 6}]
    assert [r["x"] for r in within_budget(records, 6.0)] == [1, 2, 4]
    assert [r["x"] for r in within_budget(records, 8.0)] == [1, 2, 4, 5]
    assert [r["x"] for r in within_budget(records, 99.0)] == [1, 2, 4, 5, 6]
