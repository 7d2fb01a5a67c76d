"""Caption encoders: the T5 path on a tiny random T5 (checked against a direct transformers forward on
sentencepiece's own ids), wordllama against its two files, caption cleaning, fingerprints, user errors."""

import shutil

import numpy as np
import pytest
import torch

from masc_llamagen.errors import MascError
from masc_llamagen.text import (
    TextEncoderError,
    build_text_encoder,
    clean_caption,
    extract_text_features,
    first_sentence,
)
from masc_llamagen.text.encoders import WORDLLAMA_KEY, WORDLLAMA_TOKENIZER, WORDLLAMA_WEIGHTS, wordllama_root

EOS = 1
SENTENCES = [
    "a red apple on a wooden table", "a green apple next to a red apple", "a photo of a small cat",
    "the dog runs in the park", "two birds sit on a wire", "a man wearing a blue hat",
    "a woman riding a bike in the city", "a bowl of fruit on the kitchen table", "sunset over the sea",
    "an old car parked on the street", "a child playing with a ball", "mountains covered in snow",
]


pytestmark = pytest.mark.usefixtures("one_thread")


def _save_tiny_t5(model, sp_dir, out):
    from transformers import T5Tokenizer

    T5Tokenizer.from_pretrained(str(sp_dir), extra_ids=0, local_files_only=True).save_pretrained(str(out))
    shutil.copy(sp_dir / "spiece.model", out / "spiece.model")
    model.save_pretrained(str(out))


@pytest.fixture(scope="module")
def tiny_t5(tmp_path_factory):
    """A sentencepiece model trained on the fly and a randomly initialised 2-layer T5 encoder, saved as a
    transformers directory (what a downloaded flan-t5-xl looks like, 32 wide)."""
    import sentencepiece as spm
    from transformers import T5Config, T5EncoderModel

    root = tmp_path_factory.mktemp("tiny_t5")
    sp_dir = root / "sp"
    sp_dir.mkdir()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(SENTENCES * 4), model_prefix=str(sp_dir / "spiece"),
                                   vocab_size=120, model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   hard_vocab_limit=False, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(sp_dir / "spiece.model"))
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=sp.get_piece_size(), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                   relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", dropout_rate=0.0,
                   pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    model = T5EncoderModel(cfg).eval()
    model_dir = root / "t5"
    model_dir.mkdir()
    _save_tiny_t5(model, sp_dir, model_dir)
    return {"dir": model_dir, "sp_dir": sp_dir, "sp": sp, "model": model, "root": root}


def _reference(tiny, text, max_length=120):
    """Brute force: sentencepiece's ids of the cleaned text + end token, one unpadded forward of the model object."""
    ids = tiny["sp"].encode(text)[: max_length - 1] + [EOS]
    with torch.no_grad():
        return tiny["model"](input_ids=torch.tensor([ids])).last_hidden_state[0].float(), ids


def _one_line_error(excinfo, *words):
    msg = str(excinfo.value)
    assert "\n" not in msg and isinstance(excinfo.value, MascError), msg
    for w in words:
        assert w in msg, msg


# ---------------------------------------------------------------------------------------------------------------
# cleaning


@pytest.mark.parametrize("raw, clean", [
    ("Cute CAT!!!  <b>photo</b> https://example.com/cat.jpg @bob", "cute cat! photo"),
    ("A red apple on a table... Buy at www.shop.com/apple now", "a red apple on a table. buy at now"),
    ("&amp;quot;Sunset&amp;quot; over the sea \u2014 stock photo 12345678", '"sunset" over the sea - stock photo'),
    ("***AMAZING*** view of   the\\nmountains?!?", "amazing view of the mountains?"),
    ("email me at john.doe@mail.com for prints #123", "email me at for prints"),
    ("Mother\u2019s day \u201cflowers\u201d \u2013 bouquet", "mother's day \"flowers\" - bouquet"),
    ("<person> holding an umbrella", "person holding an umbrella"),
    ('"a quoted caption"', "a quoted caption"),
    ("IMG_0042.JPG a bird on a wire", "a bird on a wire"),
    ("- a list item;", "a list item"),
    ("3.5 inch floppy disk", "3.5 inch floppy disk"),
    ("%E2%9C%93 check mark icon", "\u2713 check mark icon"),
    ("...", ""),
])
def test_clean_caption_examples(raw, clean):
    assert clean_caption(raw) == clean
    assert clean_caption(clean) == clean  # idempotent: cleaning twice changes nothing


def test_first_sentence():
    assert first_sentence("A cat. Sitting on a mat.") == "A cat"
    assert first_sentence("A 3.5 inch disk! Old.") == "A 3.5 inch disk"
    assert first_sentence("no sentence end") == "no sentence end"


# ---------------------------------------------------------------------------------------------------------------
# T5


CAPTIONS = ["A red apple on a wooden table", "Sunset", "two birds sit on a wire next to a blue hat",
            "THE DOG runs in the park!!! https://dogs.example.com/run.jpg"]


def test_t5_features_equal_a_direct_forward(tiny_t5):
    enc = build_text_encoder("t5", tiny_t5["dir"])
    assert (enc.name, enc.dim, enc.max_length, enc.dtype) == ("t5", 32, 120, torch.float32)
    feats, mask = enc(CAPTIONS)
    assert feats.shape == (4, 120, 32) and feats.dtype == torch.float32 and mask.dtype == torch.bool
    for b, cap in enumerate(CAPTIONS):
        ref, ids = _reference(tiny_t5, clean_caption(cap))
        n = len(ids)
        assert mask[b].tolist() == [False] * (120 - n) + [True] * n  # right-aligned
        assert torch.equal(feats[b, : 120 - n], torch.zeros(120 - n, 32))  # padding rows exactly zero
        torch.testing.assert_close(feats[b, 120 - n :], ref, atol=1e-5, rtol=1e-5)
    # the batch is padded to its longest caption inside: per-caption calls give the same rows
    alone = enc.encode_tokens([CAPTIONS[1]])[0]
    torch.testing.assert_close(alone, feats[1, mask[1]], atol=1e-5, rtol=1e-5)


def test_t5_lower_cases_cleans_and_truncates_at_120(tiny_t5):
    enc = build_text_encoder("t5", tiny_t5["dir"])
    messy, plain = "The DOG runs IN the park!!! https://dogs.example.com/run.jpg @someone", "the dog runs in the park!"
    assert clean_caption(messy) == plain
    a, b = enc.encode_tokens([messy, plain])
    assert torch.equal(a, b)
    raw = build_text_encoder("t5", tiny_t5["dir"], clean=False)  # lower-cased only: the link reaches the tokenizer
    ref, _ = _reference(tiny_t5, messy.lower().strip())
    torch.testing.assert_close(raw.encode_tokens([messy])[0], ref, atol=1e-5, rtol=1e-5)

    long = " ".join(SENTENCES * 3)
    assert len(tiny_t5["sp"].encode(clean_caption(long))) > 200
    feats, mask = enc([long, "a cat"])
    assert mask[0].all() and mask[1].sum() < 10
    ref, ids = _reference(tiny_t5, clean_caption(long))
    assert len(ids) == 120 and ids[-1] == EOS  # truncated to 119 tokens + the end token, like the tokenizer
    torch.testing.assert_close(feats[0], ref, atol=1e-5, rtol=1e-5)

    short = build_text_encoder("t5", tiny_t5["dir"], max_length=16)
    ref16, _ = _reference(tiny_t5, clean_caption(long), max_length=16)
    torch.testing.assert_close(short.encode_tokens([long])[0], ref16, atol=1e-5, rtol=1e-5)
    f16, m16 = short([long], slots=20)
    assert f16.shape == (1, 20, 32) and m16.sum() == 16
    with pytest.raises(TextEncoderError) as e:
        enc([long], slots=50)
    _one_line_error(e, "max_length=50")


def test_t5_fingerprint_tracks_weights_and_settings(tiny_t5, tmp_path):
    enc = build_text_encoder("t5", tiny_t5["dir"])
    fp = enc.fingerprint
    assert len(fp) == 64 and build_text_encoder("t5", tiny_t5["dir"]).fingerprint == fp
    assert build_text_encoder("t5", tiny_t5["dir"], max_length=60).fingerprint != fp
    assert build_text_encoder("t5", tiny_t5["dir"], clean=False).fingerprint != fp
    bf16 = build_text_encoder("t5", tiny_t5["dir"], dtype=torch.bfloat16)  # dtype is not part of the identity
    assert bf16.fingerprint == fp and bf16.model.dtype == torch.bfloat16
    x32, x16 = enc.encode_tokens(CAPTIONS[:1])[0], bf16.encode_tokens(CAPTIONS[:1])[0]
    assert x16.dtype == torch.float32 and (x16 - x32).abs().max() < 0.1 * x32.abs().max()

    other = tmp_path / "t5b"
    other.mkdir()
    model = tiny_t5["model"]
    with torch.no_grad():
        model.shared.weight[5, 0] += 1.0
    try:
        _save_tiny_t5(model, tiny_t5["sp_dir"], other)
    finally:
        with torch.no_grad():
            model.shared.weight[5, 0] -= 1.0
    assert build_text_encoder("t5", other).fingerprint != fp


def test_t5_errors_are_one_line(tiny_t5, tmp_path):
    with pytest.raises(TextEncoderError) as e:
        build_text_encoder("flan_t5_xl")
    _one_line_error(e, "flan-t5-xl", "downloaded", "path=")
    with pytest.raises(TextEncoderError) as e:
        build_text_encoder("flan-t5-xl", tmp_path / "nowhere")
    _one_line_error(e, "flan-t5-xl", "not a directory")
    with pytest.raises(TextEncoderError) as e:
        build_text_encoder("flan_t5_xl", tmp_path)
    _one_line_error(e, "flan-t5-xl", "config.json")
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    shutil.copy(tiny_t5["dir"] / "config.json", no_weights / "config.json")
    with pytest.raises(TextEncoderError) as e:
        build_text_encoder("t5", no_weights)
    _one_line_error(e, "no weights")
    with pytest.raises(TextEncoderError) as e:
        build_text_encoder("flan_t5_xl", tiny_t5["dir"])  # a T5, but 32 wide
    _one_line_error(e, "d_model=32", "name='t5'")
    with pytest.raises(TextEncoderError) as e:
        build_text_encoder("clip")
    _one_line_error(e, "wordllama")
    enc = build_text_encoder("t5", tiny_t5["dir"])
    with pytest.raises(TextEncoderError):
        enc([3])


def test_t5_store_round_trip(tiny_t5, tmp_path):
    enc = build_text_encoder("t5", tiny_t5["dir"])
    store = extract_text_features(enc, CAPTIONS, tmp_path / "feats", batch_size=3, chunk_size=2)
    assert len(store) == 4 and store.dim == 32 and store.fingerprint == enc.fingerprint
    direct = enc.encode_tokens(CAPTIONS)
    for i, x in enumerate(direct):
        torch.testing.assert_close(store[i], x, atol=2e-3, rtol=1e-3)  # float16 storage
    feats, mask = store.batch([3, 0])
    ref_feats, ref_mask = enc([CAPTIONS[3], CAPTIONS[0]])
    assert torch.equal(mask, ref_mask)
    torch.testing.assert_close(feats, ref_feats, atol=2e-3, rtol=1e-3)


# ---------------------------------------------------------------------------------------------------------------
# wordllama


@pytest.fixture(scope="module")
def wl_files():
    from safetensors.numpy import load_file

    from tokenizers import Tokenizer

    root = wordllama_root()
    return load_file(str(root / WORDLLAMA_WEIGHTS))[WORDLLAMA_KEY], Tokenizer.from_file(str(root / WORDLLAMA_TOKENIZER))


def test_wordllama_features_are_table_rows(wl_files):
    table, tok = wl_files
    assert table.shape == (32000, 256) and table.dtype == np.float16
    enc = build_text_encoder("wordllama")
    assert (enc.name, enc.dim, enc.max_length) == ("wordllama", 256, 120)
    caps = ["A Red Apple on a table", "sunset over the sea!!! http://x.com/a.png", "Two birds"]
    feats, mask = enc(caps)
    for b, cap in enumerate(caps):
        ids = tok.encode(clean_caption(cap), add_special_tokens=False).ids
        n = len(ids)
        assert n > 1 and mask[b].tolist() == [False] * (120 - n) + [True] * n
        assert torch.equal(feats[b, : 120 - n], torch.zeros(120 - n, 256))
        assert np.array_equal(feats[b, 120 - n :].numpy(), table[ids].astype(np.float32))
    raw = build_text_encoder("wordllama", clean=False)
    ids = tok.encode("sunset over the sea!!! http://x.com/a.png", add_special_tokens=False).ids
    assert np.array_equal(raw.encode_tokens([caps[1]])[0].numpy(), table[ids].astype(np.float32))
    assert raw.fingerprint != enc.fingerprint and build_text_encoder("wordllama").fingerprint == enc.fingerprint


def test_wordllama_truncation_and_empty_caption(wl_files):
    table, tok = wl_files
    enc = build_text_encoder("wordllama")
    long = " ".join(SENTENCES * 2)
    ids = tok.encode(clean_caption(long), add_special_tokens=False).ids
    assert len(ids) > 120
    x = enc.encode_tokens([long])[0]
    assert np.array_equal(x.numpy(), table[ids[:120]].astype(np.float32))
    feats, mask = enc(["", "!!!"])  # nothing left after cleaning: one zero row, one caption slot
    assert mask.sum(1).tolist() == [1, 1] and torch.equal(feats, torch.zeros(2, 120, 256))


def test_wordllama_colours_of_one_fruit_are_nearer_than_unrelated_captions():
    enc = build_text_encoder("wordllama")
    red, green, other = (x.mean(0) for x in enc.encode_tokens(["red apple", "green apple", "a tall office building"]))
    cos = torch.nn.functional.cosine_similarity
    assert cos(red, green, dim=0) > cos(red, other, dim=0) + 0.15
    assert cos(red, green, dim=0) > cos(green, other, dim=0) + 0.15


def test_wordllama_missing_files_are_one_line(tmp_path):
    with pytest.raises(TextEncoderError) as e:
        build_text_encoder("wordllama", tmp_path)
    _one_line_error(e, "wordllama", "missing")


def test_features_go_straight_into_the_t2i_model():
    from masc_llamagen.models.gpt import GPT, gpt_config

    enc = build_text_encoder("wordllama")
    feats, mask = enc(["a red apple", "two birds on a wire in the evening"])
    torch.manual_seed(0)
    model = GPT(gpt_config("GPT-nano", model_type="t2i", vocab_size=37, block_size=16, caption_dim=enc.dim,
                           zero_init_head=False)).eval()
    idx = torch.randint(0, 37, (2, 8))
    with torch.no_grad():
        logits, _ = model(idx, feats, caption_mask=mask)
        alone, _ = model(idx[:1], feats[:1], caption_mask=mask[:1])
    assert logits.shape == (2, 9, 37)  # 8 tokens in: 9 next-token predictions and torch.isfinite(logits).all()
    torch.testing.assert_close(logits[:1], alone, atol=1e-5, rtol=1e-5)
