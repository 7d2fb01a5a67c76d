"""task=t2i is a normal run: the same loop, heads, exact resume, sampling and in-training evaluation as c2i."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import open_dict
from train_utils import compose_cfg, make_assets

from masc_llamagen.checkpoint import TrainingCheckpoint
from masc_llamagen.data.codes import save_codes
from masc_llamagen.errors import ConfigError, TrainingError
from masc_llamagen.text import build_text_encoder, extract_text_features
from masc_llamagen.train.loop import train
from masc_llamagen.weights import load_gpt, tokenizer_fingerprint

BASE = ["head=masc", "head.k=16", "train.global_batch_size=8", "train.log_every=1", "train.ckpt_every=4",
        "task=t2i"]
NO_DROPOUT = ["model.token_dropout_p=0", "model.resid_dropout_p=0", "model.ffn_dropout_p=0"]
CAPTIONS = ["grinning face, a smileys emoji", "red apple, a food emoji", "green apple, a food emoji",
            "waving hand: medium skin tone, a people emoji", "black cat, an animal emoji", "sun behind cloud"]


@pytest.fixture(scope="module")
def t2i_assets(tmp_path_factory):
    """A random VQ, 48 caption-conditioned code sequences whose tokens depend on the caption, wordllama features."""
    from masc_llamagen.weights import load_vq

    root = tmp_path_factory.mktemp("t2i")
    base = make_assets(root / "c2i")  # its random VQ tokenizer
    vq = load_vq(base["tokenizer"])
    rng = np.random.default_rng(0)
    n, grid, v = 48, 4, 64
    which = np.arange(n) % len(CAPTIONS)
    pattern = rng.integers(0, v, (len(CAPTIONS), grid * grid))
    codes = np.where(rng.random((n, 1, grid * grid)) < 0.8, pattern[which][:, None], rng.integers(0, v, (n, 1, 16)))
    captions = [CAPTIONS[i] for i in which]
    valid = np.ones(n, bool)
    valid[5] = False  # an unreadable image: it must cost no gradient
    save_codes(root / "codes", codes, np.arange(n), codebook_size=v, grid=(grid, grid), variants=["center"],
               tokenizer={"fingerprint": tokenizer_fingerprint(vq), "checkpoint": str(base["tokenizer"])},
               captions=captions, valid=valid, dataset={"name": "twemoji"})
    enc = build_text_encoder("wordllama")
    extract_text_features(enc, captions, root / "text" / "train")
    extract_text_features(enc, CAPTIONS, root / "text" / "heldout")
    return {"tokenizer": base["tokenizer"], "codes": root / "codes", "features": root / "text" / "train",
            "heldout": root / "text" / "heldout", "root": root}


def _cfg(tmp_path, a, overrides, run="run"):
    cfg = compose_cfg(tmp_path, a, overrides, run=run)
    with open_dict(cfg):
        cfg.text.features, cfg.text.heldout_features = str(a["features"]), str(a["heldout"])
        cfg.data.image_size = 16
    return cfg


def test_t2i_trains_resumes_exactly_and_loads_strictly(tmp_path, t2i_assets):
    over = [*BASE, *NO_DROPOUT, "train.steps=8"]
    full = train(_cfg(tmp_path, t2i_assets, over, run="full"))
    part = train(_cfg(tmp_path, t2i_assets, [*over, "train.stop_after=3"], run="cut"))
    rest = train(_cfg(tmp_path, t2i_assets, over, run="cut"))
    assert part["losses"] + rest["losses"] == full["losses"]  # caption dropout drawn per (seed, epoch, item)
    assert full["losses"][-1] < full["losses"][0]
    ck_path = tmp_path / "full" / "checkpoints" / "ckpt-00000008.pt"
    model = load_gpt(ck_path)  # strict, config from the file
    assert model.config.model_type == "t2i" and model.config.cls_token_num == 120
    assert model.config.caption_dim == 256 and "cls_embedding.uncond_embedding" in model.state_dict()
    ck = TrainingCheckpoint.load(ck_path)
    torch.testing.assert_close(ck.model["cls_embedding.uncond_embedding"],
                               TrainingCheckpoint.load(tmp_path / "cut" / "checkpoints" / "ckpt-00000004.pt")
                               .model["cls_embedding.uncond_embedding"])  # a buffer: never trained
    rows = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert all("train/invalid_samples" in r for r in rows)
    assert rows[-1]["train/invalid_samples"] >= 1  # item 5 is seen within 8 x 8 draws of 48 items


def test_t2i_refuses_features_of_other_captions(tmp_path, t2i_assets):
    other = tmp_path / "other"
    extract_text_features(build_text_encoder("wordllama"), CAPTIONS, other)
    cfg = _cfg(tmp_path, t2i_assets, [*BASE, "train.steps=2"])
    with open_dict(cfg):
        cfg.text.features = str(other)
    with pytest.raises(TrainingError, match="holds features of 6 captions but the codes have 48"):
        train(cfg)
    with open_dict(cfg):
        cfg.text.features = str(tmp_path / "none")
    with pytest.raises(TrainingError, match="no caption features in .*extract them first"):
        train(cfg)


def test_t2i_in_training_grid_and_sampler_write_one_image_per_prompt(tmp_path, t2i_assets):
    from hydra import compose, initialize_config_dir
    from train_utils import CONFIGS

    from masc_llamagen.sample import sample

    train(_cfg(tmp_path, t2i_assets, [*BASE, "train.steps=4", "train.sample_every=4"], run="g"))
    assert (tmp_path / "g" / "samples" / "step00000004.png").is_file()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("red apple, a food emoji\nblack cat, an animal emoji\nsun behind cloud\n")
    out = tmp_path / "s"
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIGS)):
        cfg = compose("sample", overrides=[f"checkpoint={tmp_path / 'g' / 'checkpoints' / 'ckpt-00000004.pt'}",
                                           f"prompts={prompts}", f"out_dir={out}", "batch_size=2", "cfg_scale=3.0"])
    res = sample(cfg)
    names = sorted(p.name for p in (out / "images").iterdir())
    assert names == ["000000.png", "000001.png", "000002.png"]  # exactly one per prompt, no filler
    assert (out / "captions.txt").read_text().splitlines() == prompts.read_text().splitlines()
    rows = [json.loads(x) for x in (out / "result.jsonl").read_text().splitlines()]
    assert [r["caption"] for r in rows] == prompts.read_text().splitlines() and res["num_samples"] == 3
    # per-prompt seeds: the same prompt list in another batch size gives the same images
    out2 = tmp_path / "s2"
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIGS)):
        cfg = compose("sample", overrides=[f"checkpoint={tmp_path / 'g' / 'checkpoints' / 'ckpt-00000004.pt'}",
                                           f"prompts={prompts}", f"out_dir={out2}", "batch_size=3", "cfg_scale=3.0"])
    sample(cfg)
    from PIL import Image

    for name in names:
        assert np.array_equal(np.asarray(Image.open(out / "images" / name)),
                              np.asarray(Image.open(out2 / "images" / name)))


def test_config_refuses_t2i_without_features(tmp_path, t2i_assets):
    from masc_llamagen.config import validate

    cfg = compose_cfg(tmp_path, t2i_assets, [*BASE])
    with open_dict(cfg):
        cfg.text.features = None
    with pytest.raises(ConfigError, match="task=t2i needs text.features"):
        validate(cfg)
    assert Path(compose_cfg(tmp_path, t2i_assets, ["task=t2i"]).text.features).name == "train"


def test_extraction_cli_writes_the_store_training_reads(tmp_path, t2i_assets, capsys):
    from masc_llamagen.data.extract_text import ExtractConfig, extract
    from masc_llamagen.text import TextFeatureStore

    extract(ExtractConfig(codes=str(t2i_assets["codes"]), out=str(tmp_path / "feats"), device="cpu"))
    store = TextFeatureStore(tmp_path / "feats")
    ref = TextFeatureStore(t2i_assets["features"])
    assert len(store) == 48 and store.fingerprint == ref.fingerprint
    torch.testing.assert_close(store[7], ref[7])
    assert "48 captions" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="exactly one of codes=DIR"):
        extract(ExtractConfig(out=str(tmp_path / "x")))


@pytest.mark.slow  # a subprocess: the slow tier
def test_extraction_cli_reports_a_missing_output_in_one_line():
    import os
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "masc_llamagen.data.extract_text", "codes=x"], capture_output=True,
                       text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert p.returncode == 1 and p.stderr.strip() == "error: out=DIR is required: where to write the packed features"


@pytest.mark.slow
def test_in_training_fid_on_prompts_by_the_coco_protocol(tmp_path, t2i_assets, monkeypatch):
    """train.eval_prompts: prompts -> one image each -> clean-fid FID against a reference folder, logged with step."""
    from PIL import Image

    from masc_llamagen.eval.inception import random_inception_weights

    monkeypatch.setenv("MASC_INCEPTION_WEIGHTS", str(random_inception_weights(tmp_path / "inc.pth")))
    ref = tmp_path / "val2014"
    ref.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (40 + 8 * i, 48, 3), dtype=np.uint8)).save(ref / f"COCO_{i}.jpg")
    Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8), mode="L").save(ref / "COCO_grey.jpg")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(c + "\n" for c in CAPTIONS))
    train(_cfg(tmp_path, t2i_assets, [*BASE, "train.steps=4", "train.eval_every=2", "train.eval_samples=4",
                                      f"train.eval_prompts={prompts}", f"train.eval_reference_dir={ref}"], run="p"))
    rows = [json.loads(x) for x in (tmp_path / "p" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/fid" in r]
    assert [r["step"] for r in evals] == [2, 4] and all(np.isfinite(r["eval/fid"]) for r in evals)
    assert "eval/clip_score" not in evals[0]  # no CLIP weights: absent, never faked
    written = tmp_path / "p" / "eval" / "step00000004"
    assert len(list((written / "images").iterdir())) == 4
    assert (written / "captions.txt").read_text().splitlines() == CAPTIONS[:4]
    from masc_llamagen.eval.coco import evaluate_coco30k

    # the logged number is the protocol's on the images written for that step
    assert evaluate_coco30k(written, ref, cache_dir=tmp_path / "c")["fid"] == pytest.approx(evals[-1]["eval/fid"])


def test_trains_on_features_llamagen_already_extracted(tmp_path, t2i_assets):
    """{t5_root}/{jsonl stem}/{line}.npy as LlamaGen writes them; a missing file is an invalid sample, not a crash."""
    from masc_llamagen.data.codes import CodeDataset
    from masc_llamagen.text import TextFeatureStore

    codes = CodeDataset(t2i_assets["codes"])
    ours = TextFeatureStore(t2i_assets["features"])
    jsonl = tmp_path / "part_0.jsonl"
    jsonl.write_text("".join(json.dumps({"image_path": f"{i}.png", "text": [c]}) + "\n"
                             for i, c in enumerate(codes.captions)))
    (tmp_path / "t5" / "part_0").mkdir(parents=True)
    for i in range(len(codes.captions)):
        if i != 3:  # line 3's features were never extracted
            np.save(tmp_path / "t5" / "part_0" / f"{i}.npy", ours.numpy(i)[None].astype(np.float32))
    cfg = _cfg(tmp_path, t2i_assets, [*BASE, "train.steps=8"], run="l")
    with open_dict(cfg):
        cfg.text.features, cfg.text.llamagen_jsonl, cfg.text.llamagen_dim = str(tmp_path / "t5"), str(jsonl), 256
    out = train(cfg)
    assert out["step"] == 8 and np.isfinite(out["losses"]).all()
    rows = [json.loads(x) for x in (tmp_path / "l" / "metrics.jsonl").read_text().splitlines()]
    from masc_llamagen.train.batches import StepBatches

    drawn = np.concatenate([StepBatches(48, 8, 0, 1, 0, 0, 8).global_indices(s) for s in range(8)])
    # every draw of item 3 (no features) or item 5 (unreadable image) is counted, nothing else
    assert rows[-1]["train/invalid_samples"] == int(np.isin(drawn, [3, 5]).sum()) > 0
