"""LlamaGen's layouts: jsonl caption files (blip / llava / llava_first, first-sentence cut) and per-line T5 .npy
features read with the store interface, missing and corrupt files reported as invalid, never raised."""

import json

import numpy as np
import pytest
import torch

from masc_llamagen.errors import MascError
from masc_llamagen.text import (
    LlamaGenT5Features,
    TextStoreError,
    build_text_encoder,
    jsonl_stem,
    llamagen_captions,
    read_llamagen_jsonl,
)

C = 8  # feature width of the made-up extraction (flan-t5-xl: 2048)
LINES = [
    {"image_path": "a/0.jpg", "text": ["a red apple", "A red apple lies on a table. The light is soft.",
                                         "A red apple lies on a table"]},
    {"image_path": "a/1.jpg", "text": ["two birds", "Two birds sit on a wire! It is evening."]},  # no llava_first
    {"image_path": "a/2.jpg", "text": "a cat. on a mat"},  # a single caption: blip only
    {"image_path": "a/3.jpg", "text": ["a dog", "A dog runs.", "A dog runs"]},
]


def _write_jsonl(path, lines):
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def _one_line(excinfo, *words):
    msg = str(excinfo.value)
    assert isinstance(excinfo.value, MascError) and "\n" not in msg, msg
    for w in words:
        assert w in msg, msg


def test_read_jsonl_caption_keys(tmp_path):
    p = _write_jsonl(tmp_path / "part.jsonl", LINES)
    assert read_llamagen_jsonl(p) == [("a/0.jpg", "a red apple"), ("a/1.jpg", "two birds"),
                                      ("a/2.jpg", "a cat. on a mat"), ("a/3.jpg", "a dog")]
    assert read_llamagen_jsonl(p, "blip", first_sentence=True)[2] == ("a/2.jpg", "a cat")
    three = [LINES[i] for i in (0, 1, 3)]
    q = _write_jsonl(tmp_path / "three.jsonl", three)
    assert [c for _, c in read_llamagen_jsonl(q, "llava")] == [
        "A red apple lies on a table. The light is soft.", "Two birds sit on a wire! It is evening.", "A dog runs."]
    assert [c for _, c in read_llamagen_jsonl(q, "llava_first")] == [
        "A red apple lies on a table", "Two birds sit on a wire", "A dog runs"]  # line 2 derived from llava
    assert [c for _, c in read_llamagen_jsonl(q, "llava", first_sentence=True)] == [
        "A red apple lies on a table", "Two birds sit on a wire", "A dog runs"]
    assert llamagen_captions([p, q], "blip") == ["a red apple", "two birds", "a cat. on a mat", "a dog",
                                                 "a red apple", "two birds", "a dog"]

    with pytest.raises(TextStoreError) as e:
        read_llamagen_jsonl(p, "llava")  # line 3 has no llava caption
    _one_line(e, "line 3", "'llava'")
    with pytest.raises(TextStoreError) as e:
        read_llamagen_jsonl(p, "coca")
    _one_line(e, "blip")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(LINES[0]) + "\n{not json\n")
    with pytest.raises(TextStoreError) as e:
        read_llamagen_jsonl(bad)
    _one_line(e, "line 2", "JSON")
    _write_jsonl(bad, [{"text": ["x"]}])
    with pytest.raises(TextStoreError) as e:
        read_llamagen_jsonl(bad)
    _one_line(e, "image_path")
    with pytest.raises(TextStoreError):
        read_llamagen_jsonl(tmp_path / "none.jsonl")


@pytest.fixture
def extracted(tmp_path):
    """A made-up LlamaGen extraction of 10 lines: good (1, L, C) and (L, C) files, a missing one, garbage bytes, a
    truncated .npy, a pickled object array, a wrong width, too many tokens, an .npz under an .npy name."""
    rng = np.random.default_rng(0)
    jsonl = _write_jsonl(tmp_path / "laion.part1.jsonl", [LINES[0]] * 10)
    d = tmp_path / "t5" / "laion"  # LlamaGen's folder: the file name up to its first dot
    d.mkdir(parents=True)
    good = {0: rng.standard_normal((1, 5, C), dtype=np.float32), 1: rng.standard_normal((3, C), dtype=np.float32),
            8: rng.standard_normal((1, 120, C), dtype=np.float32)}
    for i, a in good.items():
        np.save(d / f"{i}.npy", a)
    (d / "3.npy").write_bytes(b"definitely not numpy")
    np.save(d / "4.npy", rng.standard_normal((1, 6, C), dtype=np.float32))
    (d / "4.npy").write_bytes((d / "4.npy").read_bytes()[:150])
    np.save(d / "5.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.save(d / "6.npy", np.zeros((1, 4, C + 1), dtype=np.float32))
    np.save(d / "7.npy", np.zeros((1, 121, C), dtype=np.float32))
    with open(d / "9.npy", "wb") as f:  # an .npz archive under an .npy name; line 2 has no file at all
        np.savez(f, x=np.zeros((1, 4, C), dtype=np.float32))
    return tmp_path / "t5", jsonl, good


def test_feature_reader_valid_flags_and_values(extracted):
    root, jsonl, good = extracted
    assert jsonl_stem(jsonl) == "laion"
    feats = LlamaGenT5Features(root, jsonl, dim=C)
    assert len(feats) == 10 and feats.fingerprint is None and feats.encoder_name == "flan_t5_xl"
    assert [feats.valid(i) for i in range(10)] == [True, True] + [False] * 6 + [True, False]
    assert feats.problem(2) == "missing" and "unreadable" in feats.problem(3) and feats.problem(0) is None
    assert ".npz" in feats.problem(9) and "width 8" in feats.problem(6)
    for i, a in good.items():
        assert torch.equal(feats[i], torch.from_numpy(a.reshape(-1, C)))
    with pytest.raises(TextStoreError) as e:
        feats[3]
    _one_line(e, "3.npy", "valid(i)")

    x, mask = feats.batch([1, 2, 0, 5, 8])
    assert x.shape == (5, 120, C) and mask.dtype == torch.bool
    assert mask.sum(1).tolist() == [3, 0, 5, 0, 120]
    assert torch.equal(x[0, -3:], feats[1]) and torch.equal(x[0, :-3], torch.zeros(117, C))
    assert torch.equal(x[2, -5:], feats[0]) and torch.equal(x[4], feats[8])
    assert torch.equal(x[1], torch.zeros(120, C)) and torch.equal(x[3], torch.zeros(120, C))


def test_feature_reader_folders_and_checks(extracted, tmp_path):
    root, jsonl, _ = extracted
    (tmp_path / "lists").mkdir()
    a = _write_jsonl(tmp_path / "lists" / "b.jsonl", [LINES[0]] * 2)
    _write_jsonl(tmp_path / "lists" / "a.jsonl", [LINES[0]] * 3)
    (root / "a").mkdir()
    np.save(root / "a" / "2.npy", np.ones((4, C), dtype=np.float32))
    both = LlamaGenT5Features(root, tmp_path / "lists", dim=C)  # a.jsonl then b.jsonl, as sorted
    assert len(both) == 5 and both.file(2) == root / "a" / "2.npy" and both.file(4) == root / "b" / "1.npy"
    assert [both.valid(i) for i in range(5)] == [False, False, True, False, False]
    assert LlamaGenT5Features(root, [a], dim=C).file(0) == root / "b" / "0.npy"

    wl = build_text_encoder("wordllama")
    with pytest.raises(TextStoreError) as e:
        LlamaGenT5Features(root, jsonl, dim=C).check(wl)
    _one_line(e, "256")
    LlamaGenT5Features(root, jsonl, dim=256).check(wl)
    with pytest.raises(TextStoreError):
        LlamaGenT5Features(tmp_path / "no_root", jsonl)
    with pytest.raises(TextStoreError):
        LlamaGenT5Features(root, tmp_path / "missing.jsonl")
