"""Packed caption-feature store and its extraction job: exact round trip, kill-and-resume, skip-if-done, refusal
of another encoder or other captions, 2-rank sharding equal to 1 rank, corrupt stores named."""

import json
import pickle

import numpy as np
import pytest
import torch

from masc_llamagen.errors import MascError
from masc_llamagen.text import (
    TextFeatureStore,
    TextStoreError,
    build_text_encoder,
    captions_sha256,
    extract_text_features,
    finalize_text_features,
)

CAPTIONS = [f"a {c} {t} on a {p}" for c, t, p in zip(
    ["red", "green", "blue", "yellow", "white", "black", "small", "large", "old", "new", "striped"],
    ["apple", "car", "bird", "house", "dog", "cat", "boat", "tree", "chair", "lamp", "umbrella"],
    ["table", "street", "wire", "hill", "beach", "sofa", "lake", "field", "porch", "desk", "bridge"], strict=True,
)] + ["", "sunset", "A VERY long caption about mountains, rivers and forests under a pale blue winter sky"]


class Killed(Exception):
    pass


class Spy:
    """Wraps an encoder: records each encode_tokens batch; raises Killed on call number ``die_at`` (0-based)."""

    def __init__(self, encoder, die_at=None):
        self.encoder, self.die_at, self.calls = encoder, die_at, []

    def __getattr__(self, name):
        return getattr(self.encoder, name)

    def encode_tokens(self, captions):
        if self.die_at is not None and len(self.calls) == self.die_at:
            raise Killed
        self.calls.append(list(captions))
        return self.encoder.encode_tokens(captions)


@pytest.fixture(scope="module")
def enc():
    return build_text_encoder("wordllama")


def _one_line(excinfo, *words):
    msg = str(excinfo.value)
    assert isinstance(excinfo.value, MascError) and "\n" not in msg, msg
    for w in words:
        assert w in msg, msg


def test_round_trip_is_exact(enc, tmp_path):
    store = extract_text_features(enc, CAPTIONS, tmp_path / "s", batch_size=4, chunk_size=5)
    assert isinstance(store, TextFeatureStore) and len(store) == len(CAPTIONS)
    assert store.fingerprint == enc.fingerprint and store.dim == 256 and store.encoder_name == "wordllama"
    direct = enc.encode_tokens(CAPTIONS)
    for i, x in enumerate(direct):  # wordllama's table is float16: the float16 store is lossless
        assert store[i].dtype == torch.float32 and torch.equal(store[i], x)
    assert torch.equal(store[-1], direct[-1])
    feats, mask = store.batch([2, 11, 0])
    ref_feats, ref_mask = enc([CAPTIONS[2], CAPTIONS[11], CAPTIONS[0]])
    assert feats.shape == (3, 120, 256) and torch.equal(feats, ref_feats) and torch.equal(mask, ref_mask)

    meta = json.loads((tmp_path / "s" / "meta.json").read_text())
    assert meta["captions_sha256"] == captions_sha256(CAPTIONS) and meta["count"] == len(CAPTIONS)
    assert meta["fingerprint"] == enc.fingerprint and meta["encoder"] == "wordllama" and meta["dim"] == 256
    packed = np.load(tmp_path / "s" / "features.npy", allow_pickle=False)
    index = np.load(tmp_path / "s" / "index.npy", allow_pickle=False)
    assert packed.dtype == np.float16 and index.dtype == np.int64 and index.shape == (len(CAPTIONS), 2)
    assert packed.shape[0] == sum(len(x) for x in direct) == index[:, 1].sum()
    assert not (tmp_path / "s.partial").exists()
    blob = pickle.dumps(store)  # DataLoader workers: the path travels, not the features
    assert len(blob) < 1000 and torch.equal(pickle.loads(blob)[5], store[5])
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["features.npy", "index.npy", "meta.json"]


def test_kill_and_resume_skips_what_is_done(enc, tmp_path):
    out = tmp_path / "s"
    dying = Spy(enc, die_at=3)  # chunk 0 = two batches of 2, then killed in chunk 1's second batch
    with pytest.raises(Killed):
        extract_text_features(dying, CAPTIONS, out, batch_size=2, chunk_size=4)
    assert not out.exists()  # nothing half-written under the store's name
    assert sorted(p.name for p in (tmp_path / "s.partial").glob("chunk-*")) == ["chunk-00000000.npz"]

    resumed = Spy(enc)
    store = extract_text_features(resumed, CAPTIONS, out, batch_size=2, chunk_size=4)
    assert [c for batch in resumed.calls for c in batch] == CAPTIONS[4:]  # chunk 0 was not encoded again
    extract_text_features(enc, CAPTIONS, tmp_path / "fresh", batch_size=2, chunk_size=4)
    for name in ("features.npy", "index.npy"):
        assert (out / name).read_bytes() == (tmp_path / "fresh" / name).read_bytes()
    assert len(store) == len(CAPTIONS)


def test_finished_store_is_returned_without_encoding(enc, tmp_path):
    extract_text_features(enc, CAPTIONS, tmp_path / "s", batch_size=8)
    spy = Spy(enc)
    store = extract_text_features(spy, CAPTIONS, tmp_path / "s", batch_size=8)
    assert spy.calls == [] and len(store) == len(CAPTIONS)
    store.check(enc)
    store.check(enc.fingerprint)


def test_other_encoder_or_captions_refused_unless_overwrite(enc, tmp_path):
    out = tmp_path / "s"
    extract_text_features(enc, CAPTIONS, out)
    other = build_text_encoder("wordllama", max_length=8)
    with pytest.raises(TextStoreError) as e:
        extract_text_features(other, CAPTIONS, out)
    _one_line(e, "overwrite=True", "encoder wordllama")
    with pytest.raises(TextStoreError) as e:
        extract_text_features(enc, CAPTIONS[::-1], out)
    _one_line(e, "other captions", "overwrite=True")
    with pytest.raises(TextStoreError) as e:
        TextFeatureStore(out).check(other)
    _one_line(e, "not of this encoder")

    store = extract_text_features(other, CAPTIONS, out, overwrite=True)
    assert store.fingerprint == other.fingerprint and store.max_length == 8
    assert max(len(store[i]) for i in range(len(store))) == 8
    store.check(other)

    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("mine")
    with pytest.raises(TextStoreError) as e:
        extract_text_features(enc, CAPTIONS, tmp_path / "junk")
    _one_line(e, "not a text feature store")
    (tmp_path / "empty").mkdir()
    assert len(extract_text_features(enc, CAPTIONS, tmp_path / "empty")) == len(CAPTIONS)


def test_unfinished_job_of_other_captions_refused(enc, tmp_path):
    out = tmp_path / "s"
    with pytest.raises(Killed):
        extract_text_features(Spy(enc, die_at=1), CAPTIONS, out, batch_size=2, chunk_size=2)
    with pytest.raises(TextStoreError) as e:
        extract_text_features(enc, CAPTIONS[:5], out)
    _one_line(e, "unfinished", "overwrite=True")
    spy = Spy(enc)
    store = extract_text_features(spy, CAPTIONS[:5], out, batch_size=2, overwrite=True)
    assert len(store) == 5 and [c for b in spy.calls for c in b] == CAPTIONS[:5]


@pytest.mark.parametrize("order", [(0, 1), (1, 0)])
def test_two_ranks_equal_one_rank(enc, tmp_path, order):
    one = extract_text_features(enc, CAPTIONS, tmp_path / "one", batch_size=3, chunk_size=3)
    two = tmp_path / "two"
    spies = {}
    for r in order:
        spies[r] = Spy(enc)
        got = extract_text_features(spies[r], CAPTIONS, two, batch_size=3, chunk_size=3, rank=r, world=2)
        if r == 1 or order == (0, 1):
            assert got is None  # rank 1 never joins; rank 0 first cannot yet
            if order == (0, 1) and r == 0:
                with pytest.raises(TextStoreError) as e:
                    finalize_text_features(two)
                _one_line(e, "not extracted yet", "rerun")
    if order == (0, 1):
        finalize_text_features(two)
    done = [c for b in spies[0].calls for c in b], [c for b in spies[1].calls for c in b]
    assert done[0] == CAPTIONS[:6] and done[1] == CAPTIONS[6:]  # 5 chunks of 3: contiguous shards 2 + 3
    for name in ("features.npy", "index.npy", "meta.json"):
        assert (two / name).read_bytes() == (one.path / name).read_bytes()
    assert finalize_text_features(two).fingerprint == enc.fingerprint  # finishing twice is harmless


def test_bad_arguments_and_corrupt_stores(enc, tmp_path):
    with pytest.raises(TextStoreError) as e:
        extract_text_features(enc, CAPTIONS, tmp_path / "x", rank=2, world=2)
    _one_line(e, "rank")
    with pytest.raises(TextStoreError):
        extract_text_features(enc, [], tmp_path / "x")
    with pytest.raises(TextStoreError):
        extract_text_features(enc, ["ok", None], tmp_path / "x")
    with pytest.raises(TextStoreError) as e:
        TextFeatureStore(tmp_path / "nothing")
    _one_line(e, "extract_text_features")
    with pytest.raises(TextStoreError):
        finalize_text_features(tmp_path / "nothing")

    store = extract_text_features(enc, CAPTIONS, tmp_path / "s")
    with pytest.raises(IndexError):
        store[len(CAPTIONS)]
    index = np.load(store.path / "index.npy")
    index[3, 1] += 1
    np.save(store.path / "index.npy", index)
    with pytest.raises(TextStoreError) as e:
        TextFeatureStore(store.path)
    _one_line(e, "corrupt", "overwrite=True")
    (store.path / "features.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(TextStoreError) as e:
        TextFeatureStore(store.path)
    _one_line(e, "corrupt")


def test_captions_hash_sees_order_and_boundaries():
    assert captions_sha256(["ab", "c"]) != captions_sha256(["a", "bc"])
    assert captions_sha256(["a", "b"]) != captions_sha256(["b", "a"])
    assert captions_sha256(["a", "b"]) == captions_sha256(("a", "b"))
