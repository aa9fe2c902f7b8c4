"""The analysis of speed to quality (benchmarks.speed.report): crossings and the per-noise-level table, exactly."""

import math

from benchmarks.speed import report


def test_crossing_is_linear_between_evaluations_and_inf_when_never_reached():
    curve = [(10.0, 1.0), (20.0, 0.6), (30.0, 0.2)]
    assert report.crossing(curve, 0.4) == 25.0  # halfway from 0.6 at 20 s to 0.2 at 30 s
    assert report.crossing(curve, 1.0) == 10.0
    assert report.crossing(curve, 0.1) == math.inf


def test_sigma_table_takes_the_last_evaluation_at_each_time_averages_seeds_and_bolds_the_lowest():
    per_sigma = {
        "full-size": {0: [(50.0, [0.5, 1.0]), (100.0, [0.4, 0.9])], 1: [(50.0, [0.7, 1.2]), (100.0, [0.6, 1.1])]},
        "patch": {0: [(50.0, [0.55, 0.8]), (100.0, [0.45, 0.7])], 1: [(60.0, [0.9, 0.9])]},
    }
    lines = report.sigma_table(per_sigma, [0.1, 2.0], budget_s=100.0, fractions=(0.5, 1.0)).splitlines()
    assert lines[0] == "| at s | arm | σ 0.1 | σ 2 |"
    # at 50 s: full-size (0.5+0.7)/2, (1.0+1.2)/2; patch only seed 0 has evaluated.
    assert lines[2] == "| 50 | full-size | 0.6000 | 1.1000 |"
    assert lines[3] == "| 50 | patch | **0.5500** | **0.8000** |"
    # at 100 s: patch seed 1's last evaluation is the one at 60 s.
    assert lines[4] == "| 100 | full-size | **0.5000** | 1.0000 |"
    assert lines[5] == "| 100 | patch | 0.6750 | **0.8000** |"


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
