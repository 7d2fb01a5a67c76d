"""Every weights format loads strictly; every bad file gives one clear CheckpointError."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from masc_llamagen.checkpoint import CheckpointVersionError, NotATrainingCheckpointError, TrainingCheckpoint
from masc_llamagen.models.gpt import GPT, GPTConfig, gpt_config
from masc_llamagen.weights import CheckpointError, load_gpt, load_vq, read_state_dict, save_weights


@pytest.fixture()
def small():
    torch.manual_seed(0)
    cfg = gpt_config("GPT-nano", vocab_size=40, block_size=16, num_classes=4, zero_init_head=False)
    return cfg, GPT(cfg)


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_upstream_ddp_bare_fsdp_safetensors_and_own_formats_load(tmp_path, small):
    cfg, model = small
    sd = model.state_dict()
    torch.save({"model": sd, "optimizer": {}, "steps": 10}, tmp_path / "ddp.pt")
    torch.save(sd, tmp_path / "fsdp.pt")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "w.safetensors"))
    save_weights(tmp_path / "own.safetensors", model, cfg, kind="gpt")
    torch.save({"model": sd, "model_config": cfg.__dict__, "model_kind": "gpt"}, tmp_path / "own.pt")
    for name in ("ddp.pt", "fsdp.pt", "w.safetensors"):
        assert _same(load_gpt(tmp_path / name, cfg), model), name
    for name in ("own.safetensors", "own.pt"):  # self-describing: no config needed
        loaded = load_gpt(tmp_path / name)
        assert loaded.config == cfg and _same(loaded, model), name


def test_ema_weights_are_preferred_when_present(tmp_path, small):
    cfg, model = small
    ema = {k: v + 1.0 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    torch.save({"model": model.state_dict(), "ema": ema, "model_config": cfg.__dict__}, tmp_path / "c.pt")
    assert torch.equal(load_gpt(tmp_path / "c.pt").norm.weight, ema["norm.weight"])
    assert torch.equal(load_gpt(tmp_path / "c.pt", prefer_ema=False).norm.weight, model.norm.weight)


def test_wrong_vocab_names_the_shape_and_expected_config(tmp_path, small):
    cfg, model = small
    torch.save({"model": model.state_dict()}, tmp_path / "c.pt")
    with pytest.raises(CheckpointError) as e:
        load_gpt(tmp_path / "c.pt", gpt_config("GPT-nano", vocab_size=64, block_size=16, num_classes=4))
    msg = str(e.value)
    assert "tok_embeddings.weight: checkpoint (40, 64) vs model (64, 64)" in msg
    assert "output.weight" in msg and "vocab_size=64" in msg
    assert "\n" not in msg


def test_missing_and_unexpected_keys_are_listed(tmp_path, small):
    cfg, model = small
    sd = dict(model.state_dict())
    del sd["layers.1.ffn_norm.weight"]
    sd["extra.weight"] = torch.zeros(3)
    torch.save(sd, tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match=r"missing keys \[layers\.1\.ffn_norm\.weight\].*unexpected keys "
                                              r"\[extra\.weight\]"):
        load_gpt(tmp_path / "c.pt", cfg)


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickle_with_arbitrary_objects_is_refused(tmp_path, small):
    cfg, model = small
    torch.save({"model": model.state_dict(), "args": Evil()}, tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match="refused to unpickle"):
        load_gpt(tmp_path / "c.pt", cfg)


def test_truncated_files_are_reported(tmp_path, small):
    cfg, model = small
    torch.save({"model": model.state_dict()}, tmp_path / "c.pt")
    save_weights(tmp_path / "c.safetensors", model, cfg, kind="gpt")
    for name in ("c.pt", "c.safetensors"):
        data = (tmp_path / name).read_bytes()
        (tmp_path / ("cut_" + name)).write_bytes(data[: len(data) // 2])
        with pytest.raises(CheckpointError, match="truncated"):
            load_gpt(tmp_path / ("cut_" + name), cfg)


def test_missing_file_and_missing_config(tmp_path, small):
    cfg, model = small
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_gpt(tmp_path / "nope.pt", cfg)
    torch.save({"model": model.state_dict()}, tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match="carries no model config.*GPT-XL"):
        load_gpt(tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match="unknown GPT config 'GPT-Z'"):
        load_gpt(tmp_path / "c.pt", "GPT-Z")


def test_wrong_model_kind_is_refused(tmp_path, small):
    cfg, model = small
    save_weights(tmp_path / "g.safetensors", model, cfg, kind="gpt")
    with pytest.raises(CheckpointError, match="holds a gpt model, not a vq"):
        load_vq(tmp_path / "g.safetensors")


def test_save_weights_is_atomic_and_leaves_no_temp(tmp_path, small):
    cfg, model = small
    save_weights(tmp_path / "a.safetensors", model, cfg, kind="gpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]
    sd, saved_cfg = read_state_dict(tmp_path / "a.safetensors")
    assert GPTConfig.from_dict(saved_cfg) == cfg and sd.keys() == model.state_dict().keys()


# -- the training checkpoint schema ------------------------------------------------------------------------------

def _legacy_training_checkpoint(model, cfg) -> dict:
    """The dict the training loop wrote before the schema existed (no format_version)."""
    sd = model.state_dict()
    return {"model": sd, "ema": {k: v + 1 for k, v in sd.items()}, "optimizer": {"state": {}, "param_groups": []},
            "scheduler": {"last_epoch": 3}, "rng": [{"torch": torch.get_rng_state()}], "step": 3,
            "elapsed_s": 1.5, "model_config": cfg.__dict__, "model_kind": "gpt",
            "head": {"name": "flat", "decoder": "uniform", "codebook_size": 40, "k": 40}, "head_info": {},
            "config": {"train": {"seed": 0}}, "tokenizer": {"checkpoint": "vq.pt", "codebook_sha256": "ab"}}


def test_checkpoints_written_before_the_schema_load_and_keep_their_keys(tmp_path, small):
    cfg, model = small
    old = _legacy_training_checkpoint(model, cfg)
    torch.save(old, tmp_path / "old.pt")
    ck = TrainingCheckpoint.load(tmp_path / "old.pt")
    assert ck.format_version == 1 and ck.ema_updates == 3  # no count saved then: one EMA update per step
    assert ck.tokenizer.checkpoint == "vq.pt" and ck.vocabulary().vocab_size == 40
    ck.save(tmp_path / "new.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.pt", "old.pt"]  # no temp file left
    new = torch.load(tmp_path / "new.pt", weights_only=True)
    assert set(new) == set(old) | {"ema_updates", "format_version"}
    assert all(torch.equal(new["ema"][k], old["ema"][k]) for k in old["ema"])
    assert _same(load_gpt(tmp_path / "new.pt", prefer_ema=False), model)


def test_training_checkpoint_problems_are_named(tmp_path, small):
    cfg, model = small
    torch.save({"model": model.state_dict()}, tmp_path / "weights.pt")
    with pytest.raises(NotATrainingCheckpointError, match=r"weights\.pt is not a masc-llamagen training checkpoint "
                                                          r"\(no 'optimizer'\); to start from released weights"):
        TrainingCheckpoint.load(tmp_path / "weights.pt")
    torch.save({**_legacy_training_checkpoint(model, cfg), "format_version": 2}, tmp_path / "future.pt")
    with pytest.raises(CheckpointVersionError, match="format-2 training checkpoint .* update masc-llamagen"):
        TrainingCheckpoint.load(tmp_path / "future.pt")
    torch.save({**_legacy_training_checkpoint(model, cfg), "extra": 1}, tmp_path / "extra.pt")
    with pytest.raises(CheckpointVersionError, match=r"keys this masc-llamagen does not know \(extra\)"):
        TrainingCheckpoint.load(tmp_path / "extra.pt")
    assert issubclass(NotATrainingCheckpointError, CheckpointError)


# -- parity CLI ---------------------------------------------------------------------------------------------

def _run_parity(path):
    return subprocess.run([sys.executable, "-m", "masc_llamagen.parity", str(path)], capture_output=True, text=True)


def _parity_in_process(path, capsys):
    from masc_llamagen.parity import main

    rc = main([str(path)])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.slow
def test_parity_cli_passes_on_the_golden_fixtures(fixture_dir):
    r = _run_parity(fixture_dir)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "14/14 checks passed" in r.stdout


def _write_gpt_fixture(d, model, cfg, labels, tokens, logits, greedy):
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "gpt_tiny.safetensors"))
    (d / "gpt_tiny.json").write_text(json.dumps({
        "config": {k: v for k, v in cfg.__dict__.items() if k != "zero_init_head"},
        "input_tokens": tokens.tolist(), "class_labels": labels.tolist(),
        "eval_forward": {"logits": logits.tolist()},
        "greedy_generation": {"tokens": greedy},
    }))


def test_parity_cli_is_generic_and_fails_on_mismatch(tmp_path, capsys):
    """Another grid, vocabulary, batch and cfg set in the same format passes; a perturbed reference fails."""
    from masc_llamagen.models.sampling import SamplingConfig, generate

    torch.manual_seed(11)
    cfg = GPTConfig(dim=32, n_layer=1, n_head=2, vocab_size=23, block_size=9, num_classes=6,
                    token_dropout_p=0, resid_dropout_p=0, ffn_dropout_p=0, zero_init_head=False)
    model = GPT(cfg).eval()
    labels = torch.tensor([0, 5])
    tokens = torch.randint(0, 23, (2, 8))
    with torch.no_grad():
        logits = model(tokens, labels)[0]
    greedy = {s: generate(model, labels, 9, SamplingConfig(cfg_scale=float(s), greedy=True)).tolist()
              for s in ("1.0", "2.5")}
    _write_gpt_fixture(tmp_path, model, cfg, labels, tokens, logits, greedy)
    rc, out, err = _parity_in_process(tmp_path, capsys)
    assert rc == 0, out + err
    assert "3/3 checks passed" in out

    greedy["2.5"][1][4] = (greedy["2.5"][1][4] + 1) % 23
    _write_gpt_fixture(tmp_path, model, cfg, labels, tokens, logits * 1.001, greedy)
    rc, out, _ = _parity_in_process(tmp_path, capsys)
    assert rc == 1
    assert "FAIL  gpt eval logits" in out and "FAIL  gpt greedy cfg=2.5" in out
    assert "ok    gpt greedy cfg=1.0" in out

    rc, _, err = _parity_in_process(tmp_path / "empty", capsys)
    assert rc == 2 and "neither" in err
