"""Captioned datasets (emoji packages, LlamaGen jsonl, sidecar folders), fetch_emoji.sh, and t2i code extraction."""

import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Subset

from masc_llamagen.data.captions import (
    CREDITS,
    CaptionDataError,
    CaptionFolder,
    LlamaGenJsonl,
    TwemojiCaptions,
    build_caption_dataset,
    emoji_caption,
    heldout_caption_split,
    heldout_captions,
)
from masc_llamagen.data.codes import CodeDataset, CodeFormatError, read_meta, save_codes
from masc_llamagen.data.extract import extract_codes
from masc_llamagen.data.images import DatasetNotFoundError, Twemoji
from masc_llamagen.errors import MascError
from masc_llamagen.text.clean import first_sentence
from masc_llamagen.text.store import captions_sha256
from masc_llamagen.tokenizer.vq import VQ_CONFIGS, VQConfig, VQModel

REPO = Path(__file__).resolve().parents[1]
FETCH = REPO / "scripts" / "fetch_emoji.sh"

# ---------------------------------------------------------------------------------------------------- fake package

# (unified, name, category, subcategory, skin keys); images are named like the real ones: <unified lower>.png
_EMOJI = [
    ("1F600", "GRINNING FACE", "Smileys & Emotion", "face-smiling", ()),
    ("1F44B", "WAVING HAND SIGN", "People & Body", "hand-fingers-open", ("1F3FB", "1F3FD")),
    ("1F9D1-200D-1F9B0", "PERSON: RED HAIR", "People & Body", "person", ("1F3FF",)),
    ("1F91D", "HANDSHAKE", "People & Body", "hands", ("1F3FB-1F3FF", "1F3FC-1F3FC")),
    ("1F34E", "RED APPLE", "Food & Drink", "food-fruit", ()),
    ("1F431", "CAT FACE", "Animals & Nature", "animal-mammal", ()),
    ("1F680", "ROCKET", "Travel & Places", "transport-air", ()),
    ("26BD", "SOCCER BALL", "Activities", "sport", ()),
    ("1F1EF-1F1F5", "Japan Flag", "Flags", "country-flag", ()),
    ("2764-FE0F", "HEAVY BLACK HEART", "Smileys & Emotion", "heart", ()),
    ("1F3FB", "EMOJI MODIFIER FITZPATRICK TYPE-1-2", "Component", "skin-tone", ()),
]


def _colour(k: int) -> tuple[int, int, int]:
    return ((53 * k + 40) % 256, (97 * k + 80) % 256, (31 * k + 120) % 256)


def make_package(root: Path, styles=("twitter", "google")) -> list[str]:
    """A folder laid out like `npm pack` + `tar xzf`: package/emoji.json, package/img/<style>/64/*.png (RGBA,
    an opaque square of a per-image colour on a transparent background). Returns the image names."""
    pkg = root / "package"
    entries, names = [], []
    for unified, name, cat, sub, skins in _EMOJI:
        img = unified.lower() + ".png"
        e = {"name": name, "unified": unified, "short_names": [name.lower().replace(" ", "_")], "image": img,
             "category": cat, "subcategory": sub, **{f"has_img_{s}": True for s in ("twitter", "google")}}
        names.append(img)
        if skins:
            e["skin_variations"] = {}
            for key in skins:
                v = f"{unified}-{key}".lower() + ".png"
                e["skin_variations"][key] = {"unified": f"{unified}-{key}", "image": v, "has_img_twitter": True,
                                             "has_img_google": True}
                names.append(v)
        entries.append(e)
    entries[4]["has_img_google"] = False  # Noto lacks the apple here: that style simply has one image fewer
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "emoji.json").write_text(json.dumps(entries), encoding="utf-8")
    for s_i, style in enumerate(styles):
        d = pkg / "img" / style / "64"
        d.mkdir(parents=True, exist_ok=True)
        for k, n in enumerate(names):
            rgba = np.zeros((64, 64, 4), dtype=np.uint8)
            rgba[16:48, 16:48] = (*_colour(k + 50 * s_i), 255)
            rgba[0:8, 0:8] = (0, 0, 0, 128)  # half-transparent black corner: composited on white -> mid grey
            Image.fromarray(rgba, "RGBA").save(d / n)
    return names


@pytest.fixture()
def package(tmp_path):
    make_package(tmp_path / "emoji")
    return tmp_path / "emoji"


# ---------------------------------------------------------------------------------------------------- captions


def test_emoji_caption_text():
    assert emoji_caption("GRINNING FACE", "Smileys & Emotion", "face-smiling") == \
        "grinning face, a smileys & emotion emoji (face-smiling)"
    assert emoji_caption("WAVING HAND", "People & Body", None, skin="1F3FD") == \
        "waving hand: medium skin tone, a people & body emoji"
    assert emoji_caption("MAN: RED HAIR", "People & Body", "person", skin="1F3FB") == \
        "man: red hair, light skin tone, a people & body emoji (person)"
    assert emoji_caption("HANDSHAKE", "People & Body", "hands", skin="1F3FB-1F3FF") == \
        "handshake: light skin tone, dark skin tone, a people & body emoji (hands)"
    assert emoji_caption("HANDSHAKE", "People & Body", "hands", skin="1F3FC-1F3FC") == \
        "handshake: medium-light skin tone, a people & body emoji (hands)"
    assert emoji_caption("Japan Flag", "Flags", "country-flag") == "japan flag, a flags emoji (country-flag)"
    assert emoji_caption("CAT FACE", "Animals & Nature", "animal-mammal", style="google") == \
        "cat face, an animals & nature emoji (animal-mammal), in google's noto style"
    assert emoji_caption("ROCKET", "Travel & Places", style="twitter").endswith(", in twitter's twemoji style")
    assert emoji_caption("WOMAN\u2019S HAT", "Objects", "clothing") == "woman's hat, an objects emoji (clothing)"
    with pytest.raises(CaptionDataError, match="unknown emoji style"):
        emoji_caption("ROCKET", "Travel & Places", style="apple")
    assert "CC-BY-4.0" in CREDITS and "Apache-2.0" in CREDITS


def test_twemoji_captions_fake_package(package):
    ds = TwemojiCaptions(package, split="all")
    # 11 entries + 5 skin variants, less the Component swatch
    assert len(ds) == 15 and len(ds.captions) == 15 and ds.styles == ("twitter",)
    assert ds.images == sorted(ds.images)  # file-name order
    cap = dict(zip(ds.images, ds.captions, strict=True))
    assert cap["1f600.png"] == "grinning face, a smileys & emotion emoji (face-smiling)"
    assert cap["1f44b-1f3fd.png"] == "waving hand sign: medium skin tone, a people & body emoji (hand-fingers-open)"
    assert cap["1f44b.png"] == "waving hand sign, a people & body emoji (hand-fingers-open)"
    assert cap["1f9d1-200d-1f9b0-1f3ff.png"] == "person: red hair, dark skin tone, a people & body emoji (person)"
    assert "1f3fb.png" not in cap  # Component dropped
    assert all(c == c.lower() and "style" not in c for c in ds.captions)
    assert TwemojiCaptions(package, split="all").captions == ds.captions  # deterministic
    with_swatches = TwemojiCaptions(package, split="all", exclude_categories=())
    assert len(with_swatches) == 16

    k = ds.images.index("1f600.png")
    x, i = ds[k]
    assert i == k and x.shape == (3, 64, 64) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    assert torch.equal(x[:, 60, 60], torch.ones(3))  # transparent -> white
    want = torch.tensor(_colour(_names_in_json_order().index("1f600.png"))) / 127.5 - 1
    assert torch.allclose(x[:, 32, 32], want)  # opaque -> its own colour
    grey = (255 * 127 + 0 * 128 + 127) // 255  # alpha 128 black over white
    assert abs(float(x[0, 2, 2]) - (grey / 127.5 - 1)) <= 1 / 127.5
    assert ds.valid(k) and ds.num_invalid == 0
    assert ds.labels.tolist() == list(range(15)) and ds.task == "t2i"
    small = build_caption_dataset("twemoji", "all", 32, package)
    assert small[0][0].shape == (3, 32, 32) and small.captions == ds.captions


def _names_in_json_order():
    out = []
    for unified, _, _, _, skins in _EMOJI:
        out.append(unified.lower() + ".png")
        out += [f"{unified}-{k}".lower() + ".png" for k in skins]
    return out


def test_twemoji_heldout_split_disjoint_deterministic(package):
    full = TwemojiCaptions(package, split="all")
    train, test = TwemojiCaptions(package, split="train"), TwemojiCaptions(package, split="test")
    assert set(train.images).isdisjoint(test.images)
    assert sorted(train.images + test.images) == full.images
    assert test.images == full.images[::10] and len(test) == 2  # every 10th in file-name order
    assert TwemojiCaptions(package, split="test").images == test.images
    # the rule of images.Twemoji: the same held-out images as the class-conditional set
    assert [str(p) for p, _ in Twemoji(package, split="test").samples] == [str(p) for p in test.paths]
    assert heldout_caption_split("twemoji") == "test"
    assert heldout_captions(root=package) == test.captions
    assert [c for c, p in zip(full.captions, full.paths, strict=True) if p in test.paths] == test.captions

    both = TwemojiCaptions(package, split="test", styles=("twitter", "google"))
    assert both.style_in_caption and [p.parts[-3] for p in both.paths] == ["twitter"] * 2 + ["google"] * 2
    assert both.images == test.images * 2  # the same emoji held out in every style
    assert both.captions[0] == test.captions[0] + ", in twitter's twemoji style"
    assert both.captions[2] == test.captions[0] + ", in google's noto style"
    assert both.paths[2] == package / "package" / "img" / "google" / "64" / test.images[0]
    g_all = TwemojiCaptions(package, split="all", styles=("google",))
    assert len(g_all) == 14 and "1f34e.png" not in g_all.images  # has_img_google False
    assert set(TwemojiCaptions(package, split="train", styles=("twitter", "google")).images).isdisjoint(test.images)


def test_twemoji_missing_messages(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="scripts/fetch_emoji.sh") as e:
        TwemojiCaptions(tmp_path)
    assert isinstance(e.value, MascError) and "\n" not in str(e.value)
    make_package(tmp_path, styles=("twitter",))
    with pytest.raises(DatasetNotFoundError, match=r"style 'google'.*fetch_emoji.sh .* twitter google"):
        TwemojiCaptions(tmp_path, styles=("twitter", "google"))
    with pytest.raises(CaptionDataError, match="styles="):
        TwemojiCaptions(tmp_path, styles=("twemoji",))
    with pytest.raises(ValueError, match="split"):
        TwemojiCaptions(tmp_path, split="val")


def test_unreadable_image_is_blank_and_invalid(package):
    ds = TwemojiCaptions(package, split="all")
    k = ds.images.index("1f680.png")
    ds.paths[k].write_bytes(b"not a png")  # corrupt
    (ds.paths[k + 1]).write_bytes(ds.paths[k + 1].read_bytes()[:100])  # truncated
    x, i = ds[k]
    assert i == k and x.shape == (3, 64, 64) and torch.equal(x, torch.ones_like(x))
    assert not ds.valid(k) and ds.num_invalid == 1
    assert [i for i in range(len(ds)) if not ds.valid(i)] == [k, k + 1] and ds.num_invalid == 2
    assert ds.valid(0) and ds[0][0].min() < 1


# ---------------------------------------------------------------------------------------------------- generic sets


def _save_png(path: Path, colour, mode="RGB", size=(40, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "RGBA":
        a = np.zeros((size[1], size[0], 4), dtype=np.uint8)
        a[..., :3] = colour
        a[:, : size[0] // 2, 3] = 255  # left half opaque, right half transparent
        Image.fromarray(a, "RGBA").save(path)
    else:
        Image.new("RGB", size, colour).save(path)


def test_llamagen_jsonl(tmp_path):
    root = tmp_path / "data"
    _save_png(root / "imgs" / "a.png", (255, 0, 0))
    _save_png(root / "imgs" / "b.png", (0, 0, 255), mode="RGBA")
    _save_png(root / "imgs" / "c.png", (0, 255, 0))
    lines = [
        {"image_path": "imgs/a.png", "text": ["a red square", "A crimson square. It is big."]},
        {"image_path": "imgs/b.png", "text": ["a blue half", "A navy shape. Half of it is gone."]},
    ]
    (root / "train.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    (root / "val.jsonl").write_text(json.dumps({"image_path": "imgs/c.png", "text": ["green"]}) + "\n")
    ds = build_caption_dataset("llamagen_jsonl", "train", 16, root)
    assert isinstance(ds, LlamaGenJsonl) and ds.captions == ["a red square", "a blue half"]
    assert ds.paths == [root / "imgs" / "a.png", root / "imgs" / "b.png"]
    x, i = ds[1]
    assert i == 1 and x.shape == (3, 16, 16)
    assert torch.equal(x[:, 8, 0], torch.tensor([-1.0, -1.0, 1.0]))  # opaque blue half
    assert torch.equal(x[:, 8, 15], torch.ones(3))  # transparent half -> white
    # the caption keys of masc_llamagen.text.llamagen (blip = text[0], llava = text[1])
    llava = build_caption_dataset("llamagen_jsonl", "train", 16, root, caption_key="llava")
    assert llava.captions == [x["text"][1] for x in lines]
    cut = LlamaGenJsonl(root, image_size=16, caption_key="llava", first_sentence=True).captions
    assert cut == [first_sentence(x["text"][1]) for x in lines] and cut != llava.captions
    assert heldout_captions("llamagen_jsonl", root=root, image_size=16) == ["green"]
    # a folder of lists (LlamaGen's layout) reads them in name order, the order of LlamaGenT5Features
    (root / "train").mkdir()
    for k, x in enumerate(reversed(lines)):
        (root / "train" / f"part{k}.jsonl").write_text(json.dumps(x) + "\n")
    (root / "train.jsonl").unlink()
    assert LlamaGenJsonl(root, image_size=16).captions == ["a blue half", "a red square"]
    # a single file, images relative to an explicit image_root
    (tmp_path / "lists").mkdir()
    shutil.copy(root / "train" / "part0.jsonl", tmp_path / "lists" / "x.jsonl")
    one = LlamaGenJsonl(tmp_path / "lists" / "x.jsonl", image_size=16, image_root=root)
    assert one.captions == ["a blue half"] and one.paths[0] == root / "imgs" / "b.png"

    with pytest.raises(DatasetNotFoundError, match="image_root="):
        LlamaGenJsonl(tmp_path / "lists" / "x.jsonl", image_size=16)
    with pytest.raises(MascError, match="caption_key"):
        LlamaGenJsonl(root, split="val", image_size=16, caption_key="llava")  # val lines have one caption
    with pytest.raises(DatasetNotFoundError, match="'test'"):
        LlamaGenJsonl(root, split="test", image_size=16)
    with pytest.raises(DatasetNotFoundError, match="MASC_DATA"):
        LlamaGenJsonl(tmp_path / "missing")


def test_caption_folder(tmp_path):
    root = tmp_path / "pairs"
    _save_png(root / "b.png", (0, 255, 0))
    (root / "b.txt").write_text("a green\nsquare \n")
    _save_png(root / "sub" / "a.jpg", (255, 0, 0))
    (root / "sub" / "a.txt").write_text("red")
    _save_png(root / "a.png", (0, 0, 255), mode="RGBA")
    (root / "a.txt").write_text("blue")
    _save_png(root / ".hidden" / "z.png", (0, 0, 0))
    ds = build_caption_dataset("caption_folder", "train", 16, root)
    assert isinstance(ds, CaptionFolder)
    assert [p.relative_to(root).as_posix() for p in ds.paths] == ["a.png", "b.png", "sub/a.jpg"]
    assert ds.captions == ["blue", "a green square", "red"]
    assert torch.equal(ds[0][0][:, 8, 15], torch.ones(3)) and ds[0][1] == 0
    assert torch.allclose(ds[2][0][:, 8, 8], torch.tensor([1.0, -1.0, -1.0]), atol=0.05)  # JPEG red
    _save_png(root / "c.png", (9, 9, 9))  # no sidecar
    with pytest.raises(CaptionDataError, match=r"1 of 4 images .*c.txt.*missing_captions='skip'"):
        CaptionFolder(root, image_size=16)
    assert CaptionFolder(root, image_size=16, missing_captions="skip").captions == ds.captions
    with pytest.raises(DatasetNotFoundError, match="'val'"):
        CaptionFolder(root, split="val", image_size=16)
    _save_png(root / "val" / "v.png", (1, 2, 3))
    (root / "val" / "v.txt").write_text("held out")
    assert heldout_captions("caption_folder", root=root, image_size=16) == ["held out"]
    # a bare folder serving train leaves a held-out val/ folder inside it out; "all" takes everything
    assert CaptionFolder(root, image_size=16, missing_captions="skip").captions == ds.captions
    assert len(CaptionFolder(root, split="all", image_size=16, missing_captions="skip")) == 4


def test_registry(package, tmp_path):
    assert build_caption_dataset("Twemoji", root=package).image_size == 64
    assert len(build_caption_dataset("twemoji", root=package)) == 13  # default split: train
    with pytest.raises(ValueError, match="unknown caption dataset"):
        build_caption_dataset("coco", root=tmp_path)
    with pytest.raises(DatasetNotFoundError, match="MASC_DATA"):
        build_caption_dataset("caption_folder", root=tmp_path / "nope")


def test_default_root_from_masc_data(package, monkeypatch):
    monkeypatch.setenv("MASC_DATA", str(package.parent))
    (package.parent / "twemoji").symlink_to(package)
    assert build_caption_dataset("twemoji", "all").captions == TwemojiCaptions(package, split="all").captions


# ---------------------------------------------------------------------------------------------------- codes


@pytest.fixture(scope="module")
def vq():
    torch.manual_seed(0)
    cfg = VQConfig.from_dict({**VQ_CONFIGS["VQ-tiny"].to_dict(), "codebook_size": 64})
    return VQModel(cfg).eval()


def test_extract_codes_caption_round_trip(vq, package, tmp_path):
    ds = TwemojiCaptions(package, split="all", image_size=32)
    bad = ds.images.index("1f680.png")
    ds.paths[bad].write_bytes(b"garbage")
    out = extract_codes(vq, ds, tmp_path / "codes", batch_size=4, chunk_size=6, progress=False, device="cpu")
    codes, labels, meta = np.load(out / "codes.npy"), np.load(out / "labels.npy"), read_meta(out)
    n = len(ds)
    h, w = vq.num_tokens_hw(32)
    assert codes.shape == (n, 1, h * w) and [v["name"] for v in meta["variants"]] == ["center"]
    assert labels.tolist() == list(range(n))
    with torch.inference_mode():
        want = vq.encode(torch.stack([ds[i][0] for i in range(n)])).reshape(n, -1).numpy()
    assert np.array_equal(codes[:, 0], want)
    assert meta["task"] == "t2i" and meta["num_invalid"] == 1 and meta["classes"] is None
    assert meta["dataset"]["name"] == "twemoji" and meta["dataset"]["styles"] == ["twitter"]
    # the text feature store's fingerprint, so codes and caption features can be matched
    assert meta["dataset"]["task"] == "t2i" and meta["dataset"]["captions_sha256"] == captions_sha256(ds.captions)
    rows = [json.loads(line) for line in (out / "captions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["caption"] for r in rows] == ds.captions and [r["index"] for r in rows] == list(range(n))
    valid = np.load(out / "valid.npy")
    assert valid.dtype == bool and valid.tolist() == [i != bad for i in range(n)]

    cd = CodeDataset(out)
    assert cd.task == "t2i" and cd.captions == ds.captions and cd.valid.tolist() == valid.tolist()
    c, y = cd[3]
    assert y == 3 and torch.equal(c, torch.from_numpy(want[3]).long()) and cd.captions[y] == ds.captions[3]
    # resume: the same job is recognised; different captions are a different job
    assert extract_codes(vq, ds, out, batch_size=4, chunk_size=6, progress=False, device="cpu") == out
    both = TwemojiCaptions(package, split="all", image_size=32, style_in_caption=True)
    with pytest.raises(FileExistsError, match="different job"):
        extract_codes(vq, both, out, batch_size=4, chunk_size=6, progress=False, device="cpu")

    # a subset: labels are stored positions, source_index the dataset index, captions follow the subset
    sub = Subset(ds, [5, 1, bad])
    out2 = extract_codes(vq, sub, tmp_path / "sub", batch_size=8, progress=False, device="cpu")
    cd2 = CodeDataset(out2)
    assert cd2.labels.tolist() == [0, 1, 2] and cd2.captions == [ds.captions[j] for j in (5, 1, bad)]
    assert cd2.valid.tolist() == [True, True, False]
    assert np.array_equal(cd2.codes[:, 0], want[[5, 1, bad]])
    src = [json.loads(line)["source_index"] for line in (out2 / "captions.jsonl").read_text().splitlines()]
    assert src == [5, 1, bad]

    # a build_caption_dataset spec with task="t2i"; ten-crop views work on caption sets too
    spec = {"task": "t2i", "name": "twemoji", "split": "test", "root": str(package), "image_size": 32}
    out3 = extract_codes(vq, spec, tmp_path / "spec", variants=("tencrop",), crop_ranges=(1.1,), progress=False,
                         device="cpu")
    cd3 = CodeDataset(out3)
    assert cd3.num_variants == 10 and cd3.captions == TwemojiCaptions(package, split="test").captions
    assert cd3.valid.all() and read_meta(out3)["dataset"]["split"] == "test"


def test_code_dataset_captions_from_save_codes(tmp_path):
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 32, (4, 1, 4))
    p = save_codes(tmp_path / "t2i", codes, np.arange(4), codebook_size=32, captions=["a", "b", "c", "é"],
                   valid=[True, False, True, True])
    ds = CodeDataset(p)
    assert ds.task == "t2i" and ds.captions == ["a", "b", "c", "é"] and ds.valid.tolist() == [1, 0, 1, 1]
    assert read_meta(p)["num_invalid"] == 1
    plain = CodeDataset(save_codes(tmp_path / "c2i", codes, np.array([0, 1, 0, 1]), codebook_size=32))
    assert plain.task == "c2i" and plain.captions is None and plain.valid is None
    with pytest.raises(CodeFormatError, match="arange"):
        save_codes(tmp_path / "x", codes, np.zeros(4, int), codebook_size=32, captions=list("abcd"))
    with pytest.raises(CodeFormatError, match="3 captions"):
        save_codes(tmp_path / "x", codes, np.arange(4), codebook_size=32, captions=list("abc"))
    lines = (p / "captions.jsonl").read_text(encoding="utf-8").splitlines()
    (p / "captions.jsonl").write_text("\n".join(lines[:3]) + "\n", encoding="utf-8")
    with pytest.raises(CodeFormatError, match="3 captions for 4 images"):
        CodeDataset(p)
    (p / "captions.jsonl").unlink()
    with pytest.raises(CodeFormatError, match="without captions.jsonl"):
        CodeDataset(p)


# ---------------------------------------------------------------------------------------------------- fetch script


def _fake_npm(tmp_path: Path) -> tuple[Path, Path]:
    """A bin folder whose `npm pack NAME@VER` copies a prebuilt tarball of the fake package and logs the call."""
    tgz_dir, bin_dir = tmp_path / "registry", tmp_path / "bin"
    tgz_dir.mkdir()
    bin_dir.mkdir()
    src = tmp_path / "src"
    make_package(src)
    for style in ("twitter", "google"):
        with tarfile.open(tgz_dir / f"emoji-datasource-{style}-16.0.0.tgz", "w:gz") as tf:
            tf.add(src / "package" / "emoji.json", "package/emoji.json")
            (src / f"pkg-{style}.json").write_text(json.dumps({"name": f"emoji-datasource-{style}"}))
            tf.add(src / f"pkg-{style}.json", "package/package.json")
            tf.add(src / "package" / "img" / style, f"package/img/{style}")
            tf.add(src / "package" / "emoji.json", f"package/img/{style}/sheets-256/64.png")  # not unpacked
    log = tmp_path / "npm.log"
    (bin_dir / "npm").write_text(
        "#!/bin/bash\n"
        f'echo "$@" >> {log}\n'
        'spec="${@: -1}"; name="${spec%@*}"; ver="${spec##*@}"\n'
        f'cp "{tgz_dir}/$name-$ver.tgz" . || exit 1\n'
        'echo "$name-$ver.tgz"\n'
    )
    (bin_dir / "npm").chmod(0o755)
    return bin_dir, log


def test_fetch_emoji_script(tmp_path):
    bin_dir, log = _fake_npm(tmp_path)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    dest = tmp_path / "data" / "twemoji"
    r = subprocess.run(["bash", str(FETCH), str(dest)], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "16 images" in r.stdout and log.read_text().split("\n")[0].endswith("emoji-datasource-twitter@16.0.0")
    assert len(list((dest / "package" / "img" / "twitter" / "64").glob("*.png"))) == 16
    assert not (dest / "package" / "img" / "twitter" / "sheets-256").exists()
    assert len(TwemojiCaptions(dest, split="all")) == 15
    # idempotent: nothing fetched again; a second style is added beside the first
    r = subprocess.run(["bash", str(FETCH), str(dest)], env=env, capture_output=True, text=True)
    assert r.returncode == 0 and "already" in r.stdout and len(log.read_text().splitlines()) == 1
    env_data = {**env, "MASC_DATA": str(tmp_path / "data")}
    r = subprocess.run(["bash", str(FETCH), "twitter", "google"], env=env_data, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert len(log.read_text().splitlines()) == 2 and "google" in log.read_text().splitlines()[1]
    assert len(TwemojiCaptions(dest, split="all", styles=("twitter", "google"))) == 29
    assert not list(dest.glob(".fetch-emoji.*"))  # its scratch folder is gone


def test_fetch_emoji_script_errors(tmp_path):
    tools = tmp_path / "tools"
    tools.mkdir()
    for t in ("mkdir", "mktemp", "rm", "find", "wc", "mv", "cp", "touch", "grep", "tail", "sed", "tar", "gzip"):
        w = shutil.which(t)
        if w:
            (tools / t).symlink_to(w)
    env = {"PATH": str(tools), "HOME": str(tmp_path)}
    bash = shutil.which("bash")
    r = subprocess.run([bash, str(FETCH), str(tmp_path / "d")], env=env, capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.startswith("error: npm not found") and r.stderr.count("\n") == 1
    r = subprocess.run([bash, str(FETCH)], env=env, capture_output=True, text=True)
    assert r.returncode == 1 and "set MASC_DATA" in r.stderr and r.stderr.count("\n") == 1
    bin_dir, _ = _fake_npm(tmp_path)
    (bin_dir / "npm").write_text("#!/bin/bash\necho 'npm error code E404' >&2\nexit 1\n")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    r = subprocess.run(["bash", str(FETCH), str(tmp_path / "d")], env=env, capture_output=True, text=True)
    assert r.returncode == 1 and "npm pack emoji-datasource-twitter@16.0.0 failed (npm error code E404)" in r.stderr
    assert r.stderr.count("\n") == 1
