"""Acceleration against a baseline curve, on hand-made curves."""

import json
import math

import numpy as np
import pytest

from masc_llamagen.eval.acceleration import (
    Reach,
    acceleration,
    acceleration_curve,
    area,
    area_ratio,
    first_reach,
    load_curve,
    plateau,
    reach,
    value_at,
)

BASE = [(100, 50.0), (200, 30.0), (300, 20.0), (400, 16.0)]


def brute_first_reach(curve, target, step=0.01):
    """The first point of a fine grid at which the interpolated curve is at or below the target."""
    for s in np.arange(curve[0][0], curve[-1][0] + step / 2, step):
        if value_at(curve, min(s, curve[-1][0])) <= target:
            return s
    return None


def test_first_reach_interpolates():
    assert first_reach(BASE, 40.0) == pytest.approx(150.0)
    assert first_reach(BASE, 50.0) == 100
    assert first_reach(BASE, 10.0) is None


def test_run_reaching_baseline_final_early_saves_that_share():
    run = [(100, 40.0), (200, 18.0), (300, 14.0)]
    r = acceleration(run, BASE)
    # reaches 16 between 200 (18) and 300 (14): at 250 -> 1 - 250/400
    assert r["acceleration"] == pytest.approx(1 - 250 / 400)
    assert r["step_ratio"] is None  # baseline never gets to 14


def test_run_behind_the_baseline():
    run = [(100, 60.0), (200, 40.0)]
    r = acceleration(run, BASE)
    assert r["acceleration"] is None
    assert r["step_ratio"] == pytest.approx(150 / 200)  # baseline needed 150 steps for FID 40


def test_crossing_twice_counts_the_first_crossing():
    # below 30 between 100 and 200, back above at 300, below again between 300 and 400
    run = [(100, 50.0), (200, 28.0), (300, 35.0), (400, 25.0)]
    first = 100 + (50 - 30) / (50 - 28) * 100  # 190.909...
    assert reach(run, 30.0) == Reach(pytest.approx(first), bound=False)
    assert brute_first_reach(run, 30.0) == pytest.approx(first, abs=0.011)
    # a target only the second dip gets to is reached there: 300 + (35 - 26) / (35 - 25) * 100
    assert first_reach(run, 26.0) == pytest.approx(390.0)
    assert brute_first_reach(run, 26.0) == pytest.approx(390.0, abs=0.011)


def test_curve_starting_below_the_target_is_a_bound():
    assert reach([(150, 20.0), (300, 10.0)], 25.0) == Reach(150.0, bound=True)
    assert reach([(150, 25.0), (300, 10.0)], 25.0) == Reach(150.0, bound=True)  # "at or below"
    assert reach([(150, 30.0), (300, 10.0)], 25.0).bound is False


def test_not_reached_is_none_never_a_number():
    assert reach([(100, 40.0), (200, 31.0), (300, 30.5)], 30.0) == Reach(None)


def test_curves_must_be_ordered_by_step():
    with pytest.raises(ValueError, match="increase strictly"):
        reach([(200, 1.0), (100, 2.0)], 1.5)
    with pytest.raises(ValueError, match="increase strictly"):
        reach([(100, 1.0), (100, 2.0)], 1.5)


def test_value_at_interpolates_and_never_extrapolates():
    assert value_at(BASE, 250) == pytest.approx(25.0)
    assert value_at(BASE, 400) == 16.0 and value_at(BASE, 100) == 50.0
    assert value_at(BASE, 99) is None and value_at(BASE, 401) is None


def test_acceleration_curve_by_hand():
    flat = [(100, 80.0), (200, 50.0), (400, 30.0), (800, 20.0)]
    head = [(100, 60.0), (200, 40.0), (400, 25.0), (800, 22.0)]
    rows = acceleration_curve(head, flat, run_step_s=0.5, baseline_step_s=0.4)
    assert [r["budget"] for r in rows] == [100, 200, 400, 800]
    # b=100, target 80: the head is at 60 at its first point -> 100 or earlier
    assert rows[0]["steps"] == 100 and rows[0]["bound"] and rows[0]["acceleration"] == 0.0
    # b=200, target 50: between 100 (60) and 200 (40) at 150
    assert rows[1]["steps"] == pytest.approx(150) and not rows[1]["bound"]
    assert rows[1]["acceleration"] == pytest.approx(0.25) and rows[1]["step_ratio"] == pytest.approx(0.75)
    # ... in wall-clock: 150 x 0.5 s = 75 s against 200 x 0.4 s = 80 s
    assert rows[1]["seconds"] == pytest.approx(75) and rows[1]["baseline_seconds"] == pytest.approx(80)
    assert rows[1]["time_acceleration"] == pytest.approx(1 - 75 / 80)
    # b=400, target 30: between 200 (40) and 400 (25) at 200 + 10/15 * 200
    assert rows[2]["steps"] == pytest.approx(200 + 10 / 15 * 200)
    # b=800, target 20: the head ends at 22 -> not reached, in steps and in time
    assert rows[3]["steps"] is None and rows[3]["acceleration"] is None and rows[3]["time_acceleration"] is None
    assert "seconds" not in acceleration_curve(head, flat)[0]  # no step times, no wall-clock columns


def test_acceleration_curve_on_the_issue_rerun():
    """Seed 0 of the 4x-budget rerun quoted in the issue: MASC k=512's lead shrinks, then flat is not reached."""
    flat = [(300, 104.95), (600, 79.14), (900, 73.48), (1200, 69.43)]
    masc = [(300, 91.79), (600, 76.30), (900, 71.95), (1200, 69.91)]
    rows = acceleration_curve(masc, flat)
    assert rows[0]["steps"] == 300 and rows[0]["bound"]
    assert rows[1]["steps"] == pytest.approx(300 + (91.79 - 79.14) / (91.79 - 76.30) * 300)  # 545.0
    assert rows[2]["steps"] == pytest.approx(600 + (76.30 - 73.48) / (76.30 - 71.95) * 300)  # 794.5
    assert rows[3]["steps"] is None
    # the share of steps saved: 9.2% at 600, 11.7% at 900, none at 1200
    assert [r["acceleration"] for r in rows[1:3]] == pytest.approx([1 - 544.997 / 600, 1 - 794.483 / 900], abs=1e-5)


def test_area_is_exact_for_piecewise_linear_curves():
    assert area([(0, 10.0), (10, 0.0)], 0, 10) == pytest.approx(50.0)
    head = [(100, 60.0), (200, 40.0), (400, 20.0)]
    flat = [(150, 50.0), (300, 30.0), (500, 10.0)]
    # common range [150, 400]; head: 50 x (50 + 40)/2 + 200 x (40 + 20)/2 = 8250;
    # flat: 150 x (50 + 30)/2 + 100 x (30 + 20)/2 = 8500 (flat at 400 interpolates to 20)
    assert area(head, 150, 400) == pytest.approx(8250)
    assert area(flat, 150, 400) == pytest.approx(8500)
    assert area_ratio(head, flat) == pytest.approx(8250 / 8500)
    grid = np.linspace(150, 400, 250_001)  # brute force: fine trapezoids of the interpolated curve
    dense = np.trapezoid if hasattr(np, "trapezoid") else np.trapz
    assert dense([value_at(head, x) for x in grid], grid) == pytest.approx(8250, rel=1e-6)
    # log steps: trapezoids on ln(step) over the same points
    lh = math.log(200 / 150) * 45 + math.log(2) * 30
    lf = math.log(300 / 150) * 40 + math.log(400 / 300) * 25
    assert area_ratio(head, flat, log_steps=True) == pytest.approx(lh / lf)
    assert area_ratio([(0, 1.0), (100, 1.0)], [(100, 1.0), (200, 1.0)]) is None  # one common step only
    with pytest.raises(ValueError, match="inside"):
        area(head, 50, 400)


def test_plateau_needs_two_small_doublings():
    flat = [(150, 100.0), (300, 80.0), (600, 70.0), (1200, 69.5), (2400, 69.0)]
    p = plateau(flat)
    assert p["flattened"] is True and p["steps"] == [600, 1200, 2400]
    assert p["improvements"] == pytest.approx([0.5, 0.5])
    still = [(150, 100.0), (300, 80.0), (600, 70.0), (1200, 69.9), (2400, 67.0)]  # one flat doubling, then 2.9
    assert plateau(still)["flattened"] is False
    early = [(150, 100.0), (300, 80.0), (600, 70.0), (1200, 68.5), (2400, 68.2)]  # last small, the one before not
    assert plateau(early)["flattened"] is False and plateau(early, doublings=1)["flattened"] is True
    worse = [(600, 70.0), (1200, 69.2), (2400, 69.5)]  # a rise is no improvement
    assert plateau(worse)["flattened"] is True and plateau(worse)["improvements"] == pytest.approx([0.8, -0.3])
    assert plateau(flat, threshold=0.4)["flattened"] is False


def test_plateau_on_uneven_budgets_and_short_curves():
    # S = 2000: S/2 = 1000 is scored, S/4 = 500 interpolates between 300 (40) and 1000 (35) to 40 - 5 * 200/700
    p = plateau([(100, 50.0), (300, 40.0), (1000, 35.0), (2000, 34.5)])
    assert p["improvements"] == pytest.approx([40 - 5 * 200 / 700 - 35, 0.5]) and p["flattened"] is False
    assert plateau([(1000, 40.0), (2000, 39.9)])["flattened"] is None  # does not reach back to 500
    # the issue's rerun, flat seed 0: 79.14 @ 600 -> 69.43 @ 1200 is 9.7 FID in the last doubling
    issue = plateau([(300, 104.95), (600, 79.14), (900, 73.48), (1200, 69.43)])
    assert issue["flattened"] is False and issue["improvements"] == pytest.approx([104.95 - 79.14, 79.14 - 69.43])


def test_load_curve_reads_metrics_jsonl(tmp_path):
    rows = [{"step": 10, "train/loss": 1.0}, {"step": 100, "eval/fid": 50.0}, {"step": 200, "eval/fid": 30.0}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert load_curve(tmp_path) == [(100.0, 50.0), (200.0, 30.0)]
    with pytest.raises(ValueError, match="no 'eval/kid_mean'"):
        load_curve(tmp_path, "eval/kid_mean")
    with pytest.raises(FileNotFoundError, match="baseline curve"):
        load_curve(tmp_path / "nope")
