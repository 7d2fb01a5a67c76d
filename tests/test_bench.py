"""The benchmark plans compose into valid training configs, and the report's statistics are right on hand-made data."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import convergence  # noqa: E402
import run as bench_run  # noqa: E402


@pytest.mark.parametrize("name", sorted(convergence.PLANS))
def test_every_arm_composes_with_the_plan_applied(name, tmp_path):
    plan = convergence.PLANS[name]()
    for arm in plan.arms:
        cfg = convergence.compose(convergence.train_overrides(plan, arm, 1, tmp_path), tmp_path / "run")
        assert cfg.head.name == arm.head and cfg.train.seed == 1 and cfg.train.steps == plan.steps
        assert cfg.train.global_batch_size == plan.batch and cfg.optim.lr == plan.lr
        assert cfg.train.eval_every == 0 and cfg.paths.output_dir == str(tmp_path / "run")
        steps = plan.eval_steps(arm)
        assert steps and all(s % cfg.train.ckpt_every == 0 for s in steps)  # a checkpoint exists at every eval
        if arm.head == "flat":
            assert all(d == "uniform" for _, d in plan.evals(arm))  # member decoders do not apply to flat
            n = next(t.codebook_size for t in plan.tokenizers if t.name == arm.tokenizer)
            masc = [a.k for a in plan.arms if a.tokenizer == arm.tokenizer and a.head == "masc"]
            assert cfg.head.compare_k == (max(masc) if masc else None) and (not masc or max(masc) == n // 2)
        else:
            assert cfg.head.k == arm.k


def test_full_plan_covers_the_issue():
    plan = convergence.full_plan()
    assert len(plan.seeds) >= 3 and plan.fid_samples >= 1000 and plan.fid_reference >= 1000
    n = plan.tokenizers[0].codebook_size
    labels = {(a.tokenizer, a.label) for a in plan.arms}
    t1, t2 = plan.tokenizers[0].name, plan.tokenizers[1].name
    assert {(t1, "flat"), (t1, f"masc-k{n // 2}"), (t1, f"masc-k{n // 4}"), (t1, f"kmeans-k{n // 2}"),
            (t1, f"random-k{n // 2}")} <= labels
    n2 = plan.tokenizers[1].codebook_size
    assert n2 > n and {(t2, "flat"), (t2, f"masc-k{n2 // 2}")} <= labels
    masc = next(a for a in plan.arms if a.label == f"masc-k{n // 2}" and a.tokenizer == t1)
    assert {d for _, d in plan.evals(masc)} == {"uniform", "frequency"}
    assert len(plan.eval_steps(masc)) >= 2  # more than one step budget for the acceleration curve


def test_verdict_calls_only_what_the_interval_supports():
    assert "better" in bench_run._verdict("x", np.array([-5.0, -6.0, -5.5]))
    assert "worse" in bench_run._verdict("x", np.array([5.0, 6.0, 5.5]))
    assert "contains 0" in bench_run._verdict("x", np.array([-5.0, 4.0, 0.5]))
    assert "one seed" in bench_run._verdict("x", np.array([-5.0]))
    # the interval itself: mean -2, sd 1, n 3 -> half width t(0.975, 2) * 1 / sqrt(3) = 2.484
    line = bench_run._verdict("x", np.array([-1.0, -2.0, -3.0]))
    assert "[-4.48, +0.48]" in line
