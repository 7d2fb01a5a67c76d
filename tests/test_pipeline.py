"""Default-job plumbing: stage stamps decide what is skipped; the default composes to the CPU MASC run."""

import json

from masc_llamagen.pipeline import STAGES, Stamp, compose_train
from masc_llamagen.report import class_grid, plot_curves, write_report


def test_stamp_is_fresh_only_for_the_same_inputs_and_an_existing_output(tmp_path):
    out = tmp_path / "codes"
    s = Stamp(out, {"tokenizer": "a", "size": 32})
    assert not s.fresh()  # nothing there yet
    out.mkdir()
    assert not s.fresh()  # output without a stamp: made by something else, redo
    s.write({"codes": str(out)})
    assert s.fresh() and Stamp(out, {"size": 32, "tokenizer": "a"}).fresh()
    assert not Stamp(out, {"tokenizer": "b", "size": 32}).fresh()
    out.rmdir()
    assert not s.fresh()


def test_default_job_composes_to_the_cpu_masc_run():
    cfg = compose_train([])
    assert cfg.name == "cpu_default" and cfg.head.name == "masc" and cfg.model.arch == "GPT-micro"
    assert cfg.train.cpu and cfg.data.name == "fashion_mnist"
    assert compose_train(["head=flat"]).paths.output_dir != cfg.paths.output_dir
    assert STAGES[0] == "tokenizer" and STAGES[-1] == "report"


def test_report_has_numbers_grids_and_curves(tmp_path):
    import numpy as np

    rows = [{"step": s, "train/loss": 5.0 / s, "train/fine_nll_bits": 9.0 / s} for s in range(1, 6)]
    curves = plot_curves(rows, tmp_path / "curves.png")
    npz = tmp_path / "s.npz"
    np.savez(npz, arr_0=np.zeros((20, 8, 8, 3), np.uint8), labels=np.repeat(np.arange(2), 10))
    grid = class_grid(npz, tmp_path / "grid.png", per_class=5)
    from PIL import Image

    assert Image.open(grid).size[1] == 2 * Image.open(grid).size[0] // 5  # 2 rows of 5
    md = write_report(tmp_path / "README.md", {"Sample quality": {"fid": 12.345678}}, {"curves": curves}, ["note"])
    text = md.read_text()
    assert "| fid | 12.35 |" in text and "![curves](curves.png)" in text and json.dumps("note")[1:-1] in text
