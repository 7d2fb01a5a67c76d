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


def test_codes_are_redone_when_the_image_root_changes(tmp_path):
    from omegaconf import open_dict

    from masc_llamagen.pipeline import codes_inputs

    cfg = compose_train([])
    tok = tmp_path / "tok.safetensors"
    tok.write_bytes(b"x")
    with open_dict(cfg):
        cfg.tokenizer.checkpoint = str(tok)
    a = Stamp(tmp_path / "codes", codes_inputs(cfg))
    with open_dict(cfg):
        cfg.data.root = str(tmp_path / "elsewhere")
    assert Stamp(tmp_path / "codes", codes_inputs(cfg)).key != a.key


def test_rerunning_some_stages_merges_the_record(tmp_path):
    from masc_llamagen.pipeline import merge_record

    rec = tmp_path / "pipeline.json"
    merge_record(rec, {"timings_s": {"train": 10.0, "eval": 5.0}, "train": {"step": 300}, "eval": {"fid": 90.0}})
    merge_record(rec, {"timings_s": {"report": 1.0}, "report": "README.md", "train": None})
    got = json.loads(rec.read_text())
    assert got["train"] == {"step": 300} and got["eval"] == {"fid": 90.0} and got["report"] == "README.md"
    assert got["timings_s"] == {"train": 10.0, "eval": 5.0, "report": 1.0}
