"""The one evaluation: held-out codes encoded once per tokenizer, and the checks before scoring."""

from __future__ import annotations

import pytest
import torch
from train_utils import make_assets

from masc_llamagen.data.images import DatasetNotFoundError, build_image_dataset
from masc_llamagen.eval.metrics import EvalError
from masc_llamagen.eval.model_eval import HeldoutCodes, evaluate_model
from masc_llamagen.masc.vocabulary import build_vocabulary
from masc_llamagen.models.gpt import GPT, gpt_config
from masc_llamagen.weights import load_vq


@pytest.fixture(scope="module")
def heldout_images():
    try:
        return build_image_dataset("fashion_mnist", "test", image_size=16)
    except DatasetNotFoundError as e:
        pytest.skip(str(e))


def test_heldout_codes_are_the_tokenizers_codes_cached_per_tokenizer(tmp_path, heldout_images):
    vq = load_vq(make_assets(tmp_path)["tokenizer"]).eval()
    first = HeldoutCodes.encode(vq, "fashion_mnist", 5, image_size=16, cache_dir=tmp_path / "cache", batch=2)
    with torch.no_grad():
        want = torch.cat([vq.encode(heldout_images[i][0][None]).reshape(1, -1) for i in range(5)])
    assert torch.equal(first.codes, want)
    assert first.labels.tolist() == [int(heldout_images[i][1]) for i in range(5)]

    again = HeldoutCodes.encode(vq, "fashion_mnist", 5, image_size=16, cache_dir=tmp_path / "cache")
    assert again.path == first.path and torch.equal(again.codes, first.codes)

    with torch.no_grad():  # another tokenizer never reads the first one's cache
        vq.quantize.embedding.weight.mul_(-1.0)
    other = HeldoutCodes.encode(vq, "fashion_mnist", 5, image_size=16, cache_dir=tmp_path / "cache")
    assert other.path != first.path and len(list((tmp_path / "cache").iterdir())) == 2


def test_heldout_classes_beyond_the_model_are_refused_in_one_line():
    model = GPT(gpt_config("GPT-nano", vocab_size=8, block_size=4, num_classes=3)).eval()
    heldout = HeldoutCodes(torch.zeros(2, 4, dtype=torch.long), torch.tensor([0, 7]))
    with pytest.raises(EvalError, match="class ids up to 7 but the model has 3 classes"):
        evaluate_model(model, {"uniform": build_vocabulary("flat", 8)}, heldout=heldout)


@pytest.mark.slow
def test_eval_job_adds_a_checkpoints_heldout_likelihood(tmp_path, heldout_images):
    """scripts/eval.sh CHECKPOINT heldout=N: the same numbers as scoring its EMA model on codes encoded here."""
    import json

    import numpy as np
    from train_utils import compose_cfg

    from masc_llamagen.checkpoint import TrainingCheckpoint
    from masc_llamagen.eval.inception import random_inception_weights
    from masc_llamagen.eval.job import EvalJob, evaluate
    from masc_llamagen.eval.likelihood import heldout_diagnostics
    from masc_llamagen.train.loop import train
    from masc_llamagen.weights import load_gpt

    assets = make_assets(tmp_path, classes=10)
    out = train(compose_cfg(tmp_path, assets, ["train.steps=2", "train.global_batch_size=8", "data.image_size=16"]))
    ref = tmp_path / "ref.npz"
    np.savez(ref, arr_0=np.random.default_rng(0).integers(0, 256, (8, 16, 16, 3), dtype=np.uint8))
    _, written = evaluate(EvalJob(generated=out["checkpoint"], reference=str(ref), num_samples=8, batch_size=8,
                                  weights=str(random_inception_weights(tmp_path / "inc.pth")), feature_layer="192",
                                  cache_dir=str(tmp_path / "cache"), device="cpu", quiet=True, heldout=4))
    got = json.loads(written.read_text())["heldout"]

    vq = load_vq(assets["tokenizer"]).eval()
    with torch.no_grad():
        codes = torch.cat([vq.encode(heldout_images[i][0][None]).reshape(1, -1) for i in range(4)])
    labels = torch.tensor([int(heldout_images[i][1]) for i in range(4)])
    ck = TrainingCheckpoint.load(out["checkpoint"])
    want = heldout_diagnostics(load_gpt(out["checkpoint"], prefer_ema=True).eval(),
                               {"uniform": ck.vocabulary("uniform")}, codes, labels)
    assert got == pytest.approx({k: float(v) for k, v in want.items()}, rel=1e-6)


def test_heldout_on_samples_instead_of_a_checkpoint_is_refused(tmp_path):
    import numpy as np

    from masc_llamagen.errors import ConfigError
    from masc_llamagen.eval.job import EvalJob, evaluate

    npz = tmp_path / "s.npz"
    np.savez(npz, arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(ConfigError, match="heldout=N scores a checkpoint"):
        evaluate(EvalJob(generated=str(npz), reference=str(npz), heldout=4))


def test_training_with_heldout_eval_on_codes_of_fewer_classes_is_refused_before_step_one(tmp_path, heldout_images):
    from train_utils import compose_cfg

    from masc_llamagen.errors import ConfigError
    from masc_llamagen.train.loop import train

    cfg = compose_cfg(tmp_path, make_assets(tmp_path, classes=4), ["train.steps=2", "train.eval_every=1"])
    with pytest.raises(ConfigError, match="held-out images have 10 classes but the codes .* have 4"):
        train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()
