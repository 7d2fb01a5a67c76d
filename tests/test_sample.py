"""Sampling from a training checkpoint writes a valid ADM-style npz, PNGs and a sidecar; decoders decode members."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from train_utils import compose_cfg, make_assets

from masc_llamagen.sample import sample, sample_labels
from masc_llamagen.train.loop import train

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("s")
    assets = make_assets(root)
    out = train(compose_cfg(root, assets, ["head=random", "head.k=16", "train.steps=4", "train.global_batch_size=8",
                                           "train.ckpt_every=4"], run="run"))
    return root, Path(out["checkpoint"])


def _sample_cfg(overrides):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIGS)):
        return compose("sample", overrides=overrides)


def test_sample_writes_npz_pngs_and_sidecar(trained):
    root, ckpt = trained
    out_dir = root / "samples"
    cfg = _sample_cfg([f"checkpoint={ckpt}", "num_samples=6", "batch_size=4", f"out_dir={out_dir}", "cfg_scale=1.5",
                       "decoder=frequency"])
    res = sample(cfg)
    with np.load(out_dir / "samples.npz", allow_pickle=False) as z:
        arr, labels = z["arr_0"], z["labels"]
    assert arr.dtype == np.uint8 and arr.shape == (6, 16, 16, 3)  # 4x4 tokens x downsample 4
    assert labels.tolist() == sample_labels(6, 4, "balanced", 0).tolist()
    assert len(list(out_dir.glob("*.png"))) == 6
    meta = json.loads((out_dir / "samples.npz.json").read_text())
    assert meta["head"] == "random" and meta["decoder"] == "frequency" and meta["step"] == 4
    assert res["npz"] == str(out_dir / "samples.npz")
    again = sample(_sample_cfg([f"checkpoint={ckpt}", "num_samples=6", "batch_size=4", f"out_dir={root / 's2'}",
                                "cfg_scale=1.5", "decoder=frequency", "png=false"]))
    with np.load(again["npz"]) as z:
        assert np.array_equal(z["arr_0"], arr)  # seeded: identical


def test_balanced_labels_cover_classes_equally():
    labels = sample_labels(40, 10, "balanced", 0)
    assert torch.bincount(labels).tolist() == [4] * 10
    assert sample_labels(5, 10, "random", 1).max() < 10


def test_wrong_tokenizer_is_refused(trained, tmp_path):
    root, ckpt = trained
    other = make_assets(tmp_path, codebook_size=32)
    cfg = _sample_cfg([f"checkpoint={ckpt}", "num_samples=2", f"vq_checkpoint={other['tokenizer']}",
                       f"out_dir={tmp_path / 'o'}"])
    from masc_llamagen.weights import CheckpointError

    with pytest.raises(CheckpointError, match="is not the one the model was trained on"):
        sample(cfg)


def test_eval_cli_samples_a_checkpoint_then_scores_it(trained, tmp_path):
    """scripts/eval.sh CHECKPOINT: sample (EMA weights, sidecar names the data) then FID against a reference npz."""
    from masc_llamagen.eval.inception import random_inception_weights
    from masc_llamagen.eval.job import EvalJob, evaluate

    root, ckpt = trained
    weights = random_inception_weights(tmp_path / "inception.pth", seed=0)
    ref = tmp_path / "ref.npz"
    np.savez(ref, arr_0=np.random.default_rng(0).integers(0, 256, (8, 16, 16, 3), dtype=np.uint8))
    _, written = evaluate(EvalJob(generated=str(ckpt), reference=str(ref), num_samples=8, batch_size=8,
                                  weights=str(weights), feature_layer="192", cache_dir=str(tmp_path / "cache"),
                                  device="cpu", quiet=True))
    found = list((root / "run" / "samples").rglob("samples_metrics.json"))
    assert [p.resolve() for p in found] == [written.resolve()]
    m = json.loads(found[0].read_text())
    assert m["n_generated"] == 8 and m["fid"] > 0


def test_image_size_eval_resizes_before_writing(trained):
    """LlamaGen scores its 384-px models at 256: bicubic on the decoded images, recorded in the sidecar."""
    from masc_llamagen.checkpoint import load_for_sampling
    from masc_llamagen.models.sampling import SamplingConfig
    from masc_llamagen.sample import sample_images, sample_tokens
    from masc_llamagen.utils.images import to_uint8_numpy

    root, ckpt = trained
    out_dir = root / "small"
    res = sample(_sample_cfg([f"checkpoint={ckpt}", "num_samples=3", f"out_dir={out_dir}", "image_size_eval=8",
                              "png=false"]))
    with np.load(out_dir / "samples.npz", allow_pickle=False) as z:
        assert z["arr_0"].shape == (3, 8, 8, 3)
    assert json.loads((out_dir / "samples.npz.json").read_text())["sampling"]["image_size_eval"] == 8
    ck = load_for_sampling(ckpt)
    model, vq, vocab = ck.model, ck.vq, ck.vocabulary
    sc, labels = SamplingConfig(cfg_scale=2.0), torch.arange(3)
    tokens = sample_tokens(model, vocab, labels, sc, 0, indices=torch.arange(3))
    full = vq.decode_code(tokens.reshape(-1, 4, 4))
    expected = to_uint8_numpy(torch.nn.functional.interpolate(full, size=(8, 8), mode="bicubic"))
    np.testing.assert_array_equal(sample_images(model, vocab, vq, labels, sc, 0, indices=torch.arange(3),
                                                image_size=8), expected)
    assert res["shape"] == (3, 8, 8, 3)
