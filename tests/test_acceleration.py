"""Acceleration against a baseline curve, on hand-made curves."""

import json

import pytest

from masc_llamagen.eval.acceleration import acceleration, first_reach, load_curve

BASE = [(100, 50.0), (200, 30.0), (300, 20.0), (400, 16.0)]


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


def test_load_curve_reads_metrics_jsonl(tmp_path):
    rows = [{"step": 10, "train/loss": 1.0}, {"step": 100, "eval/fid": 50.0}, {"step": 200, "eval/fid": 30.0}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert load_curve(tmp_path) == [(100.0, 50.0), (200.0, 30.0)]
    with pytest.raises(ValueError, match="no 'eval/kid_mean'"):
        load_curve(tmp_path, "eval/kid_mean")
    with pytest.raises(FileNotFoundError, match="baseline curve"):
        load_curve(tmp_path / "nope")
