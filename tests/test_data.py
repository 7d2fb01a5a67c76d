"""Image datasets, code extraction (center/flip and ten-crop), resume, and the packed CodeDataset."""

import json
import pickle
import shutil
import threading
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from masc_llamagen.data import (
    ArrayImageDataset,
    CodeDataset,
    CodeFormatError,
    DatasetNotFoundError,
    FashionMNIST,
    ImageFolderDataset,
    Twemoji,
    build_image_dataset,
    center_crop_pil,
    code_dtype,
    dataset_to_uint8,
    default_root,
    draw_variant,
    extract_codes,
    heldout_split,
    read_meta,
    save_codes,
    variant_plan,
)
from masc_llamagen.data.codes import write_split
from masc_llamagen.data.extract import _Views
from masc_llamagen.data.images import FASHION_MNIST_DEBIAN_ROOT
from masc_llamagen.tokenizer import build_vq
from masc_llamagen.weights import tokenizer_fingerprint

HAVE_FASHION = (default_root("fashion_mnist") / "t10k-images-idx3-ubyte.gz").is_file()
needs_fashion = pytest.mark.skipif(
    not HAVE_FASHION, reason=f"Fashion-MNIST absent (sudo apt-get install -y dataset-fashion-mnist -> "
    f"{FASHION_MNIST_DEBIAN_ROOT})"
)


# ---------------------------------------------------------------------------------------------------- images


@needs_fashion
def test_fashion_mnist_test_split():
    ds = FashionMNIST("test")
    assert len(ds) == 10_000 and ds.num_classes == 10 and len(ds.classes) == 10
    assert np.array_equal(np.bincount(ds.labels), np.full(10, 1000))
    x, y = ds[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and isinstance(y, int)
    assert torch.equal(x[0], x[1]) and torch.equal(x[0], x[2])
    assert x.min() >= -1 and x.max() <= 1 and x.max() > 0
    # 2-pixel padding with the black background (-1).
    border = torch.cat([x[:, :2].flatten(), x[:, -2:].flatten(), x[:, :, :2].flatten(), x[:, :, -2:].flatten()])
    assert torch.all(border == -1)
    u = dataset_to_uint8(ds, 8)
    assert u.shape == (8, 32, 32, 3) and u.dtype == np.uint8
    assert np.array_equal(u[0], ((x + 1) * 127.5).round().byte().permute(1, 2, 0).numpy())
    assert heldout_split("fashion-mnist") == "test"
    big = build_image_dataset("fashion-mnist", split="test", image_size=64)
    assert big[0][0].shape == (3, 64, 64) and big[0][1] == y


def test_fashion_mnist_missing_message(tmp_path, monkeypatch):
    with pytest.raises(DatasetNotFoundError) as e:
        FashionMNIST("train", root=tmp_path)
    msg = str(e.value)
    assert "sudo apt-get install -y dataset-fashion-mnist" in msg and "root=" in msg and "\n" not in msg
    monkeypatch.setenv("MASC_DATA", str(tmp_path))
    (tmp_path / "fashion_mnist").mkdir()
    assert default_root("fashion_mnist") == tmp_path / "fashion_mnist"
    with pytest.raises(DatasetNotFoundError, match="MASC_DATA"):
        build_image_dataset("fashion_mnist")


def _save_png(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def test_image_folder_classes_and_center_crop(tmp_path):
    rng = np.random.default_rng(0)
    # 2x2-constant blocks make the BOX halving exact, so the expected crop is computed by hand.
    small = rng.integers(0, 256, (16, 32, 3), dtype=np.uint8)  # H x W
    wide = np.repeat(np.repeat(small, 2, 0), 2, 1)  # 32 x 64
    _save_png(tmp_path / "zebra" / "a.png", wide)
    small2 = rng.integers(0, 256, (48, 24, 3), dtype=np.uint8)
    _save_png(tmp_path / "apple" / "sub" / "b.png", np.repeat(np.repeat(small2, 2, 0), 2, 1))  # 96 x 48
    _save_png(tmp_path / "apple" / "c.png", small2)
    (tmp_path / "empty_class").mkdir()
    (tmp_path / "zebra" / "notes.txt").write_text("not an image")

    ds = ImageFolderDataset(tmp_path, image_size=16)
    assert ds.classes == ["apple", "empty_class", "zebra"] and len(ds) == 3
    assert [y for _, y in ds.samples] == [0, 0, 2]
    x, y = ds[2]  # zebra/a.png: 32 x 64 -> BOX -> 16 x 32 (= small) -> centre 16 columns from (32 - 16) // 2 = 8
    assert y == 2 and x.shape == (3, 16, 16)
    want = torch.from_numpy(small[:, 8:24].copy()).permute(2, 0, 1).float() / 127.5 - 1
    assert torch.equal(x, want)
    # crop_range 1.5: 96 x 48 -> BOX to 48 x 24 (= small2) -> centre 24 rows from 12 -> centre 16 from offset 4.
    ds15 = ImageFolderDataset(tmp_path, image_size=16, crop_range=1.5)
    i = [p.name for p, _ in ds15.samples].index("b.png")
    want = torch.from_numpy(small2[12 + 4 : 12 + 20, 4:20].copy()).permute(2, 0, 1).float() / 127.5 - 1
    assert torch.equal(ds15[i][0], want)
    # The ADM crop on an exact-size image is the identity.
    img = Image.fromarray(small2[:24])
    assert np.array_equal(np.asarray(center_crop_pil(img, 24)), small2[:24])

    with pytest.raises(DatasetNotFoundError, match="does not exist"):
        ImageFolderDataset(tmp_path / "nope", image_size=16)
    with pytest.raises(DatasetNotFoundError, match="no images"):
        ImageFolderDataset(tmp_path / "empty_class", image_size=16)
    assert build_image_dataset("imagefolder", root=tmp_path, image_size=16).classes == ds.classes
    with pytest.raises(DatasetNotFoundError, match="'val'"):
        build_image_dataset("imagefolder", split="val", root=tmp_path, image_size=16)
    with pytest.raises(ValueError, match="unknown image dataset"):
        build_image_dataset("mnist")


def test_twemoji_fake_package(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="npm pack emoji-datasource-twitter@16.0.0"):
        Twemoji(tmp_path)
    img_dir = tmp_path / "package" / "img" / "twitter" / "64"
    img_dir.mkdir(parents=True)
    rgba = np.zeros((64, 64, 4), dtype=np.uint8)
    rgba[16:48, 16:48] = (255, 0, 0, 255)  # opaque red square on a transparent background
    for name in ("1f600.png", "1f600-1f3fb.png", "1f34e.png", "1f3fb.png"):
        Image.fromarray(rgba).save(img_dir / name)
    entries = [
        {"image": "1f600.png", "category": "Smileys & Emotion", "has_img_twitter": True,
         "skin_variations": {"1F3FB": {"image": "1f600-1f3fb.png", "has_img_twitter": True}}},
        {"image": "1f34e.png", "category": "Food & Drink", "has_img_twitter": True},
        {"image": "1f3fb.png", "category": "Component", "has_img_twitter": True},
    ]
    (tmp_path / "package" / "emoji.json").write_text(json.dumps(entries))
    ds = Twemoji(tmp_path, image_size=32)
    assert ds.classes == ["Food & Drink", "Smileys & Emotion"] and len(ds) == 3
    assert sorted(ds.labels.tolist()) == [0, 1, 1]
    x, _ = ds[0]
    assert x.shape == (3, 32, 32)
    assert torch.equal(x[:, 0, 0], torch.ones(3))  # transparent -> white
    assert torch.allclose(x[:, 16, 16], torch.tensor([1.0, -1.0, -1.0]))


# ---------------------------------------------------------------------------------------------------- extraction


def _images(n=64, size=32, seed=0):
    """Smooth random colour images (upsampled noise), so codes vary the way they do on real pictures."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, size // 4, size // 4, generator=g)
    x = torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    return (x * 255).round().byte().permute(0, 2, 3, 1).numpy()


class _Counting(torch.utils.data.Dataset):
    """Counts item reads (resume must skip finished chunks); optionally dies mid-way like a killed job."""

    def __init__(self, ds, fail_after=None):
        self.ds, self.reads, self.fail_after = ds, 0, fail_after

    def __getattr__(self, name):
        return getattr(self.__dict__["ds"], name)

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        if self.fail_after is not None and self.reads >= self.fail_after:
            raise KeyboardInterrupt("simulated kill")
        self.reads += 1
        return self.ds[i]


@pytest.fixture(scope="module")
def vq():
    torch.manual_seed(0)
    return build_vq("VQ-tiny").eval()


@pytest.fixture(scope="module")
def image_set():
    rng = np.random.default_rng(1)
    return ArrayImageDataset(_images(64), rng.integers(0, 10, 64), classes=[f"c{i}" for i in range(10)], name="toy")


def _load(path):
    return np.load(path / "codes.npy"), np.load(path / "labels.npy"), read_meta(path)


@pytest.fixture(scope="module")
def reference(vq, image_set, tmp_path_factory):
    """One uninterrupted extraction (4 chunks of 16), shared by the checks below."""
    out = tmp_path_factory.mktemp("ref") / "train"
    extract_codes(vq, image_set, out, batch_size=64, chunk_size=16, progress=False, device="cpu",
                  tokenizer_path="tok.safetensors")
    return out


def test_extract_center_hflip_matches_encode(vq, image_set, reference):
    codes, labels, meta = _load(reference)
    assert codes.shape == (64, 2, 64) and codes.dtype == np.int16 == code_dtype(1024)
    assert np.array_equal(labels, image_set.labels) and labels.dtype == np.int64
    assert meta["codebook_size"] == 1024 and meta["grid"] == [8, 8] and meta["count"] == 64
    assert [v["name"] for v in meta["variants"]] == ["center", "hflip"] and meta["num_classes"] == 10
    assert meta["tokenizer"]["fingerprint"] == tokenizer_fingerprint(vq)
    assert meta["tokenizer"]["checkpoint"] == "tok.safetensors"
    assert meta["dataset"]["name"] == "toy" and meta["dataset"]["image_size"] == 32
    assert not reference.with_name("train.partial").exists()
    x = torch.stack([image_set[i][0] for i in range(64)])
    with torch.no_grad():
        center = vq.encode(x).reshape(64, -1).numpy()
        flipped = vq.encode(x.flip(-1)).reshape(64, -1).numpy()
    assert np.array_equal(codes[:, 0], center) and np.array_equal(codes[:, 1], flipped)
    assert not np.array_equal(center, flipped)
    # Same job again: returns at once; another tokenizer in the same place is refused.
    assert extract_codes(vq, image_set, reference, progress=False, chunk_size=16) == reference
    with pytest.raises(FileExistsError, match="different job"):
        extract_codes(build_vq("VQ-tiny"), image_set, reference, progress=False, chunk_size=16)
    (reference.parent / "unrelated").mkdir()
    (reference.parent / "unrelated" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a packed code set"):
        extract_codes(vq, image_set, reference.parent / "unrelated", progress=False, resume=False)


def test_extract_resume_after_kill_and_after_deleting_output(vq, image_set, reference, tmp_path):
    ref_codes, ref_labels, _ = _load(reference)
    dying = _Counting(image_set, fail_after=40)  # chunks 0-1 (32 images) finished, chunk 2 half done
    with pytest.raises(KeyboardInterrupt):
        extract_codes(vq, dying, tmp_path / "run", batch_size=32, chunk_size=16, progress=False, keep_chunks=True)
    parts = sorted(p.name for p in (tmp_path / "run.partial").glob("chunk_*.npz"))
    assert parts == ["chunk_000000.npz", "chunk_000001.npz"] and not (tmp_path / "run").exists()
    again = _Counting(image_set)
    out = extract_codes(vq, again, tmp_path / "run", batch_size=32, chunk_size=16, progress=False, keep_chunks=True)
    assert again.reads == 32
    codes, labels, _ = _load(out)
    assert np.array_equal(codes, ref_codes) and np.array_equal(labels, ref_labels)

    shutil.rmtree(out)  # the packed files are gone, the kept chunks are not: no image is encoded again
    third = _Counting(image_set)
    extract_codes(vq, third, tmp_path / "run", batch_size=32, chunk_size=16, progress=False)
    assert third.reads == 0 and np.array_equal(_load(out)[0], ref_codes)
    assert not (tmp_path / "run.partial").exists()  # keep_chunks=False this time


def test_extract_sharded_over_two_processes(vq, image_set, reference, tmp_path):
    """Two ranks (threads with a real barrier, standing in for Accelerate) encode alternate chunks; rank 0 packs."""
    barrier = threading.Barrier(2, timeout=120)
    sub = torch.utils.data.Subset(image_set, range(32))
    errors = []

    def rank(r):
        acc = SimpleNamespace(process_index=r, num_processes=2, device=torch.device("cpu"),
                              wait_for_everyone=barrier.wait)
        try:
            extract_codes(vq, sub, tmp_path / "ddp", chunk_size=8, batch_size=16, accelerator=acc, progress=False,
                          keep_chunks=True)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    codes, labels, meta = _load(tmp_path / "ddp")
    assert np.array_equal(codes, _load(reference)[0][:32]) and np.array_equal(labels, image_set.labels[:32])
    assert meta["count"] == 32 and "subset_sha256" in meta["dataset"]


def test_tencrop_geometry_and_codes(vq, tmp_path):
    imgs = _images(3, size=40, seed=3)
    ds = ArrayImageDataset(imgs, [0, 1, 2], name="toy40")
    plan = variant_plan(("tencrop",), (1.1, 1.05))
    assert len(plan) == 20 and plan[0] == {"name": "center@1.1", "crop_range": 1.1, "crop": "center", "hflip": False}
    views, y = _Views(ds, plan, 40)[1]
    assert views.shape == (20, 3, 40, 40) and y == 1
    # torchvision's TenCrop order is (tl, tr, bl, br, center) then the same on the mirrored image.
    order = ["tl", "tr", "bl", "br", "center"]
    for r in (1.1, 1.05):
        full = center_crop_pil(Image.fromarray(imgs[1]), int(40 * r))
        ref = TF.ten_crop(TF.pil_to_tensor(full), [40, 40])
        for j, v in enumerate(plan):
            if v["crop_range"] == r:
                k = order.index(v["crop"]) + (5 if v["hflip"] else 0)
                assert torch.equal(views[j], ref[k].float() / 127.5 - 1), v["name"]
    two = torch.utils.data.Subset(ds, [2, 1])
    out = extract_codes(vq, two, tmp_path / "ten", variants=("tencrop",), crop_ranges=(1.1,), progress=False)
    codes, labels, meta = _load(out)
    assert codes.shape == (2, 10, 100) and meta["extraction"]["crop_ranges"] == [1.1] and labels.tolist() == [2, 1]
    with torch.no_grad():
        assert np.array_equal(codes[1], vq.encode(views[:10]).reshape(10, -1).numpy())
    # Another crop range is another job: refused in place unless resume=False, which replaces the output.
    with pytest.raises(FileExistsError, match="different job"):
        extract_codes(vq, two, out, variants=("tencrop",), crop_ranges=(1.05,), progress=False)
    extract_codes(vq, two, out, variants=("tencrop",), crop_ranges=(1.05,), progress=False, resume=False)
    assert _load(out)[2]["variants"][0]["crop_range"] == 1.05 and _load(out)[0].shape == (2, 10, 100)
    with pytest.raises(ValueError, match="tencrop"):
        variant_plan(("tencrop", "hflip"))


# ---------------------------------------------------------------------------------------------------- CodeDataset


@pytest.fixture()
def code_dir(tmp_path):
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 100, (50, 4, 16))
    labels = rng.integers(0, 5, 50)
    path = save_codes(tmp_path / "codes", codes, labels, codebook_size=100, num_classes=5,
                      variants=["center", "hflip", "a", "b"])
    return path, codes, labels


def test_code_dataset_variants_deterministic(code_dir):
    path, codes, labels = code_dir
    ds = CodeDataset(path, seed=7)
    assert len(ds) == 50 and ds.grid == (4, 4) and ds.codebook_size == 100 and ds.num_classes == 5
    x, y = ds[3]
    assert x.dtype == torch.int64 and x.shape == (16,) and y == labels[3]
    v0 = [ds.variant_index(i) for i in range(50)]
    assert np.array_equal(x.numpy(), codes[3, v0[3]])
    assert v0 == [draw_variant(7, 0, i, 4) for i in range(50)] == [CodeDataset(path, seed=7).variant_index(i)
                                                                    for i in range(50)]
    ds.set_epoch(1)
    v1 = [ds.variant_index(i) for i in range(50)]
    assert sum(a != b for a, b in zip(v0, v1, strict=True)) > 25 and set(v0) == set(range(4))
    assert np.array_equal(ds[3][0].numpy(), codes[3, v1[3]])
    assert [CodeDataset(path, seed=8).variant_index(i) for i in range(50)] != v0
    plain = CodeDataset(path, augment=False)
    plain.set_epoch(5)
    assert all(np.array_equal(plain[i][0].numpy(), codes[i, 0]) for i in range(50))
    clone = pickle.loads(pickle.dumps(ds))  # what a spawned DataLoader worker gets
    assert clone.__dict__["_codes"] is None and torch.equal(clone[3][0], ds[3][0])
    assert np.array_equal(ds.code_counts(), np.bincount(codes.ravel(), minlength=100))
    assert ds.code_counts().dtype == np.int64


def test_code_dataset_rejects_bad_codes(code_dir, tmp_path):
    path, codes, labels = code_dir
    with pytest.raises(CodeFormatError, match=r"\[0, 100\)"):
        save_codes(tmp_path / "bad", codes + 1, labels, codebook_size=100)
    tampered = np.load(path / "codes.npy")
    tampered[10, 2, 5] = 100
    np.save(path / "codes.npy", tampered)
    with pytest.raises(CodeFormatError, match="image 10"):
        CodeDataset(path)
    np.save(path / "codes.npy", tampered[:40])
    with pytest.raises(CodeFormatError, match="shape"):
        CodeDataset(path)
    np.save(path / "codes.npy", codes.astype(np.int16))
    meta = json.loads((path / "meta.json").read_text())
    meta["grid"] = [8, 8]
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CodeFormatError, match="h\\*w"):
        CodeDataset(path)
    with pytest.raises(FileNotFoundError, match="extract"):
        CodeDataset(tmp_path / "nothing")


def test_write_split_streamed_blocks_give_the_whole_array_files(code_dir, tmp_path):
    """Extraction streams its chunks through write_split: the files must be those of the whole array (save_codes)."""
    path, codes, labels = code_dir
    meta = read_meta(path)
    out = write_split(tmp_path / "streamed", (codes[s : s + 7] for s in range(0, 50, 7)), labels, meta)
    for f in ("codes.npy", "labels.npy", "meta.json"):
        assert (out / f).read_bytes() == (path / f).read_bytes(), f
    with pytest.raises(CodeFormatError, match="30 images of codes"):
        write_split(tmp_path / "short", [codes[:30]], labels, meta)
    with pytest.raises(CodeFormatError, match="does not fit"):
        write_split(tmp_path / "narrow", [codes[:, :2]], labels, meta)
    wrapped = codes.copy()
    wrapped[33, 1, 2] = 65536 + 5  # the int16 cast would turn it into 5, a valid index
    with pytest.raises(CodeFormatError, match="image 33"):
        write_split(tmp_path / "wrap", (wrapped[s : s + 7] for s in range(0, 50, 7)), labels, meta)
    with pytest.raises(CodeFormatError, match="image 33"):
        save_codes(tmp_path / "wrap", wrapped, labels, codebook_size=100)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["codes", "streamed"]  # no half-written split left
