"""The analysis of speed to quality (benchmarks.speed.report): crossings and the per-noise-level table, exactly."""

import math

from benchmarks.speed import report


def test_crossing_is_linear_between_evaluations_and_inf_when_never_reached():
    curve = [(10.0, 1.0), (20.0, 0.6), (30.0, 0.2)]
    assert report.crossing(curve, 0.4) == 25.0  # halfway from 0.6 at 20 s to 0.2 at 30 s
    assert report.crossing(curve, 1.0) == 10.0
    assert report.crossing(curve, 0.1) == math.inf


def test_sigma_table_takes_the_evaluation_of_each_time_averages_seeds_and_bolds_the_lowest():
    # Evaluations land just after their grid point (after the first step whose training time reaches it).
    per_sigma = {
        "full-size": {0: [(51.0, [0.5, 1.0]), (102.0, [0.4, 0.9])], 1: [(50.5, [0.7, 1.2]), (100.2, [0.6, 1.1])]},
        "patch": {0: [(50.1, [0.55, 0.8]), (100.4, [0.45, 0.7])], 1: [(20.0, [2.0, 2.0]), (53.0, [0.9, 0.9])]},
    }
    lines = report.sigma_table(per_sigma, [0.1, 2.0], budget_s=100.0, fractions=(0.5, 1.0)).splitlines()
    assert lines[0] == "| at s | arm | σ 0.1 | σ 2 |"
    # at 50 s: full-size (0.5+0.7)/2, (1.0+1.2)/2; patch seed 1's evaluation of 50 s is the one at 53 s.
    assert lines[2] == "| 50 | full-size | **0.6000** | 1.1000 |"
    assert lines[3] == "| 50 | patch | 0.7250 | **0.8500** |"
    # at 100 s: patch seed 1 ended before it (no evaluation of 100 s): seed 0 alone.
    assert lines[4] == "| 100 | full-size | 0.5000 | 1.0000 |"
    assert lines[5] == "| 100 | patch | **0.4500** | **0.7000** |"
    # On a grid of 30 s, a quarter of 100 s names the grid point 30 s and takes the evaluation of 30 s.
    grid = {"a": {0: [(0.0, [1.0]), (30.4, [0.8]), (60.1, [0.6]), (90.2, [0.5]), (120.3, [0.45])]}}
    lines = report.sigma_table(grid, [0.1], budget_s=100.0, fractions=(0.25, 0.5), every=30.0).splitlines()
    assert lines[2:] == ["| 30 | a | 0.8000 |", "| 60 | a | 0.6000 |"]
    # A budget off the grid (375 s on 50): its whole-budget row is the run's last evaluation, at its budget,
    # not the grid point past it (400 s), which no run reaches.
    off = {"a": {0: [(50.2, [0.9]), (350.1, [0.5]), (375.3, [0.4])]}}
    lines = report.sigma_table(off, [0.1], budget_s=375.0, fractions=(1.0,), every=50.0).splitlines()
    assert lines[2:] == ["| 375 | a | 0.4000 |"]


def test_posthoc_table_compares_the_training_ema_at_the_same_evaluation_as_the_post_hoc_point():
    from benchmarks.speed import posthoc  # imports latentpatch: the post-hoc reconstruction it calls

    # post-hoc points every other evaluation: (seconds, best loss, its std)
    curves = {"patch+phema": {0: [(40.0, 0.50, 0.05), (80.0, 0.30, 0.1)], 1: [(40.0, 0.70, 0.035), (80.0, 0.5, 0.07)]}}
    ema = {"patch+phema": {0: [(20.0, 0.9), (40.0, 0.6), (60.0, 0.45), (80.0, 0.4)],
                           1: [(20.0, 0.9), (40.0, 0.8), (60.0, 0.65), (80.0, 0.6)]}}
    lines = posthoc.posthoc_table(curves, ema, budget_s=80.0).splitlines()
    assert len(lines) == 4  # at a quarter (20 s) no post-hoc point yet: no row
    assert lines[2] == "| 40 | patch+phema | 0.7000 | 0.6000 | 0.050, 0.035 |"  # the EMA at 40 s, not at 60 s
    assert lines[3] == "| 80 | patch+phema | 0.5000 | 0.4000 | 0.100, 0.070 |"


def test_step_costs_once_used_do_not_move_when_an_arm_is_measured_later():
    half, full, quarter = (16, 16, 32, False), (32, 32, 16, False), (8, 8, 64, False)
    first = {"full-size": {full: 0.25}, "patch": {full: 0.5, half: 0.125}}
    used = report.settled_costs({}, first)
    assert used == {full: 0.375, half: 0.125}  # the median over the arms that took each kind
    later = {**first, "quarter": {full: 0.75, half: 0.25, quarter: 0.0625}}
    assert report.pooled(later)[full] == 0.5  # re-pooling would move every run's time axis
    assert report.settled_costs(used, later) == {full: 0.375, half: 0.125, quarter: 0.0625}


def test_crop_cost_ratios_are_of_medians_with_the_range_of_the_extremes_and_the_table_says_them():
    from benchmarks.speed import crop_cost

    saved = {"demo|16|64|full": [4.0, 5.0, 6.0], "demo|16|64|half": [1.0, 1.5, 2.0],
             "demo|16|16|full": [0.5, 0.5, 0.5], "demo|16|16|half": [0.25, 0.5, 0.25]}
    assert crop_cost.ratio_range((1.5, 1.0, 2.0), (5.0, 4.0, 6.0)) == (0.3, 1.0 / 6.0, 0.5)
    lines = crop_cost.table(saved).splitlines()
    assert lines[2] == ("| demo (b16/32/64) | 16x16 | 64 | 0.500 (0.500-0.500) | 0.250 (0.250-0.500) | - "
                        "| 0.500 (0.500-1.000) | - |")
    assert lines[3] == ("| demo (b16/32/64) | 64x64 | 1024 | 5.000 (4.000-6.000) | 1.500 (1.000-2.000) | - "
                        "| 0.300 (0.167-0.500) | - |")


def test_the_cost_table_axis_prices_each_step_taken_before_an_evaluation_by_its_kind():
    from pathlib import Path

    from benchmarks.speed import arms, cost_table

    data = {"heldout": Path("held"), "train": Path("train")}
    records = [{"step": 0, "heldout_loss": 0.9}, {"step": 3, "heldout_loss": 0.5}, {"step": 5, "heldout_loss": 0.4}]
    full = arms.arm_config("full-size", 0, data, 100, "faces80")
    assert cost_table.priced_curve(records, full, 16, {(16, 16, 16, False): 0.5}) == [(0.0, 0.9), (1.5, 0.5),
                                                                                       (2.5, 0.4)]
    # The default schedule: each step priced by the kind its own draw gave (full 16x16 x16 or half 8x8 x32).
    half = arms.arm_config("half-crops", 0, data, 100, "faces80")
    kinds = list(cost_table.step_kinds(half, 5, 16))
    assert set(kinds) <= {(16, 16, 16, False), (8, 8, 32, False)}
    prices = {(16, 16, 16, False): 1.0, (8, 8, 32, False): 0.25}
    curve = cost_table.priced_curve(records, half, 16, prices)
    assert curve[1] == (sum(prices[k] for k in kinds[:3]), 0.5) and curve[2][0] == sum(prices[k] for k in kinds)


def test_posthoc_table_takes_the_training_emas_last_evaluation_before_a_snapshot_between_evaluations():
    from benchmarks.speed import posthoc

    curves = {"patch+phema": {0: [(41.5, 0.50, 0.05), (83.0, 0.30, 0.1)]}}  # snapshots every N steps
    ema = {"patch+phema": {0: [(0.0, 1.0), (20.2, 0.9), (40.1, 0.6), (60.3, 0.45), (80.4, 0.4)]}}  # a time grid
    lines = posthoc.posthoc_table(curves, ema, budget_s=83.0).splitlines()
    assert lines[2] == "| 42 | patch+phema | 0.6000 | 0.5000 | 0.050 |"  # half the budget: 41.5 s
    assert lines[3] == "| 83 | patch+phema | 0.4000 | 0.3000 | 0.100 |"
