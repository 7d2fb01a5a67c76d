"""Class-conditional image datasets: every item is ``(float tensor (3, S, S) in [-1, 1], int label)``.

Three sources, all offline: Fashion-MNIST read from the Debian gzip idx files, any ImageNet-layout folder, and the
Twemoji colour set from npm. Paths are arguments; when one is omitted, :func:`default_root` supplies it (one place,
overridable through the ``MASC_DATA`` environment variable), so no path is spelled anywhere else.
"""

from __future__ import annotations

import gzip
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets.folder import make_dataset

from masc_llamagen.errors import MascError
from masc_llamagen.utils.images import from_uint8, to_uint8_numpy

DATA_ENV = "MASC_DATA"  # a directory holding <dataset name>/ folders; overrides the built-in defaults
FASHION_MNIST_DEBIAN_ROOT = "/usr/share/datasets/fashion-mnist"  # where `apt-get install dataset-fashion-mnist` puts it
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")
TWEMOJI_PACKAGE = "emoji-datasource-twitter@16.0.0"

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
_FASHION_MNIST_FILES = {"train": "train", "test": "t10k"}
_IDX_IMAGES_MAGIC, _IDX_LABELS_MAGIC = 2051, 2049

# The split that is never trained on; FID reference sets and held-out reconstruction metrics use it.
HELDOUT_SPLITS = {"fashion_mnist": "test", "imagefolder": "val", "twemoji": "test"}
DEFAULT_IMAGE_SIZES = {"fashion_mnist": 32, "imagefolder": 256, "twemoji": 64}


class DatasetNotFoundError(MascError, FileNotFoundError):
    """A dataset that is not on disk; the message says how to install it or point to it."""


def canonical_name(name: str) -> str:
    """Accept ``fashion-mnist``/``FashionMNIST``/``fashion_mnist`` alike, so configs and CLIs need not agree."""
    key = name.strip().lower().replace("-", "_")
    aliases = {"fashionmnist": "fashion_mnist", "image_folder": "imagefolder", "imagenet": "imagefolder"}
    return aliases.get(key, key)


def default_root(name: str) -> Path | None:
    """The one place dataset paths come from when the caller gives none.

    ``$MASC_DATA/<name>`` wins when it exists; otherwise Fashion-MNIST falls back to the Debian package location.
    ImageFolder and Twemoji have no system location, so they need ``root`` or ``$MASC_DATA``.
    """
    name = canonical_name(name)
    env = os.environ.get(DATA_ENV)
    if env and (Path(env) / name).exists():
        return Path(env) / name
    if name == "fashion_mnist":
        if env:  # said, not silent: the user pointed somewhere else
            print(f"warning: ${DATA_ENV}={env} has no {name}/ folder; using the system copy in "
                  f"{FASHION_MNIST_DEBIAN_ROOT}", file=sys.stderr, flush=True)
        return Path(FASHION_MNIST_DEBIAN_ROOT)
    return Path(env) / name if env else None


def heldout_split(name: str) -> str:
    """Name of the held-out split: Fashion-MNIST's official t10k set, ImageNet's ``val``, Twemoji's every 10th."""
    return HELDOUT_SPLITS[canonical_name(name)]


# ------------------------------------------------------------------------------------------------------------
# Geometry shared by the datasets and by code extraction


def center_crop_pil(img: Image.Image, size: int) -> Image.Image:
    """ADM-style centre crop: halve with BOX filtering while the short side is >= 2 * size, then resize the short
    side to ``size`` with BICUBIC, then cut the central square.

    Repeated box halving avoids the aliasing a single large bicubic downscale gives, which matters for FID.
    """
    while min(img.size) >= 2 * size:
        img = img.resize((img.size[0] // 2, img.size[1] // 2), resample=Image.BOX)
    scale = size / min(img.size)
    img = img.resize((round(img.size[0] * scale), round(img.size[1] * scale)), resample=Image.BICUBIC)
    left, top = (img.size[0] - size) // 2, (img.size[1] - size) // 2
    return img.crop((left, top, left + size, top + size))


def crop_offset(full: int, size: int) -> int:
    """Centre offset rounded as torchvision's CenterCrop/TenCrop do, so our ten crops are LlamaGen's pixels."""
    return int(round((full - size) / 2.0))


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float (3, H, W) in [-1, 1] (x / 127.5 - 1: uint8 round-trips exactly)."""
    return from_uint8(np.asarray(img.convert("RGB"), dtype=np.uint8))


# ------------------------------------------------------------------------------------------------------------
# Fashion-MNIST


def _read_idx(path: Path, magic: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    head = np.frombuffer(raw[:4], dtype=">u4")[0]
    if head != magic:
        raise ValueError(f"{path}: not an idx file with magic {magic} (found {head}); is it corrupt?")
    ndim = magic & 0xFF
    dims = np.frombuffer(raw[4 : 4 + 4 * ndim], dtype=">u4").astype(np.int64)
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: {data.size} bytes of data for dims {dims.tolist()}; the file is truncated")
    return data.reshape(*dims)


def _fashion_missing(missing: Path) -> DatasetNotFoundError:
    return DatasetNotFoundError(
        f"Fashion-MNIST not found ({missing} is missing): install it with "
        f"`sudo apt-get install -y dataset-fashion-mnist` (files land in {FASHION_MNIST_DEBIAN_ROOT}), or point to "
        f"a folder holding the {{train,t10k}}-{{images-idx3,labels-idx1}}-ubyte.gz files with root=... or "
        f"${DATA_ENV}/fashion_mnist"
    )


class FashionMNIST(Dataset):
    """Fashion-MNIST as a 10-class colour image set for the VQ tokenizer (which wants 3 channels, sizes % 4 == 0).

    28 x 28 is zero-padded by 2 pixels per side to 32 x 32. Zero is the dataset's own black background, so the
    padding is invisible (it becomes -1 in [-1, 1]) and no garment is cut or resampled. Other ``image_size``
    values resize the padded image (bicubic, antialiased). Grey is repeated to RGB. The official t10k set is the
    held-out ``test`` split. All images are held in memory as uint8 (60k x 32 x 32 = 61 MB).
    """

    name = "fashion_mnist"
    classes = FASHION_MNIST_CLASSES
    native_size = 32

    def __init__(
        self, split: str = "train", root: str | os.PathLike | None = None, image_size: int = 32,
        random_flip: bool = False,
    ) -> None:
        if split not in _FASHION_MNIST_FILES:
            raise ValueError(f"Fashion-MNIST split must be one of {sorted(_FASHION_MNIST_FILES)}, got {split!r}")
        self.root = Path(root) if root is not None else default_root(self.name)
        self.split = split
        self.image_size = int(image_size)
        self.random_flip = random_flip
        stem = _FASHION_MNIST_FILES[split]
        img_path = self.root / f"{stem}-images-idx3-ubyte.gz"
        lab_path = self.root / f"{stem}-labels-idx1-ubyte.gz"
        for p in (img_path, lab_path):
            if not p.is_file():
                raise _fashion_missing(p)
        images = _read_idx(img_path, _IDX_IMAGES_MAGIC)
        labels = _read_idx(lab_path, _IDX_LABELS_MAGIC).astype(np.int64)
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"{self.root}: {images.shape[0]} images but {labels.shape[0]} labels")
        pad = (self.native_size - images.shape[1]) // 2
        images = np.pad(images, ((0, 0), (pad, pad), (pad, pad)))
        if self.image_size != self.native_size:
            images = _resize_grey(images, self.image_size)
        self.images_uint8 = np.ascontiguousarray(images)  # (N, S, S) uint8, grey
        self.labels = labels
        self.num_classes = len(self.classes)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = from_uint8(self.images_uint8[i][..., None])[0]
        if self.random_flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x.unsqueeze(0).expand(3, -1, -1).contiguous(), int(self.labels[i])

    def uint8_images(self, n: int | None = None) -> np.ndarray:
        """(N, S, S, 3) uint8 without the per-item loop (the flip is never applied: these are reference images)."""
        g = self.images_uint8[: len(self) if n is None else n]
        return np.repeat(g[..., None], 3, axis=-1)


def _resize_grey(images: np.ndarray, size: int, batch: int = 4096) -> np.ndarray:
    if size < 4:
        raise ValueError(f"image_size={size} is too small")
    out = np.empty((images.shape[0], size, size), dtype=np.uint8)
    for s in range(0, images.shape[0], batch):
        x = torch.from_numpy(images[s : s + batch]).float().unsqueeze(1)
        y = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
        out[s : s + batch] = y.round().clamp(0, 255).to(torch.uint8).squeeze(1).numpy()
    return out


# ------------------------------------------------------------------------------------------------------------
# ImageFolder (ImageNet layout)


def _is_image_file(path: str) -> bool:
    name = os.path.basename(path)
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


class ImageFolderDataset(Dataset):
    """``root/<class>/**/<image>``: class folders sorted by name give label ids (ImageNet's synset order).

    Each image is ADM-centre-cropped to ``int(image_size * crop_range)``; for ``crop_range > 1`` the central
    ``image_size`` square of that is returned (code extraction takes ten crops from it instead; see extract.py).
    """

    name = "imagefolder"

    def __init__(
        self, root: str | os.PathLike, image_size: int = 256, crop_range: float = 1.0, random_flip: bool = False,
        split: str | None = None,
    ) -> None:
        self.root = Path(root)
        self.split = split
        self.image_size = int(image_size)
        self.crop_range = float(crop_range)
        self.random_flip = random_flip
        if self.crop_range < 1.0:
            raise ValueError(f"crop_range={crop_range} must be >= 1 (it enlarges the centre crop before cropping)")
        if not self.root.is_dir():
            raise DatasetNotFoundError(
                f"image folder {self.root} does not exist: pass root=<folder with one sub-folder per class> "
                f"(ImageNet layout, e.g. .../train/n01440764/*.JPEG) or set ${DATA_ENV}"
            )
        self.classes = sorted(d.name for d in self.root.iterdir() if d.is_dir() and not d.name.startswith("."))
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        found = (make_dataset(self.root, self.class_to_idx, is_valid_file=_is_image_file, allow_empty=True)
                 if self.classes else [])  # torchvision's scan: a sorted walk, symlinks followed
        self.samples = [(Path(p), y) for p, y in found]
        if not self.samples:
            raise DatasetNotFoundError(
                f"image folder {self.root} holds no images in class sub-folders ({len(self.classes)} sub-folders, "
                f"extensions {', '.join(IMAGE_EXTENSIONS)}): expected root/<class>/<image>"
            )
        self.labels = np.array([y for _, y in self.samples], dtype=np.int64)
        self.num_classes = len(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def load_image(self, i: int) -> Image.Image:
        """The decoded RGB image, before any crop (extraction crops it several ways)."""
        with Image.open(self.samples[i][0]) as img:
            return img.convert("RGB")

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        full = int(self.image_size * self.crop_range)
        img = center_crop_pil(self.load_image(i), full)
        if full != self.image_size:
            o = crop_offset(full, self.image_size)
            img = img.crop((o, o, o + self.image_size, o + self.image_size))
        x = pil_to_tensor(img)
        if self.random_flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x, int(self.samples[i][1])


def resolve_split_folder(root: str | os.PathLike, split: str) -> Path:
    """``root/<split>`` when it exists (ImageNet's train/ and val/); a bare class folder serves ``train`` only."""
    root = Path(root)
    if (root / split).is_dir():
        return root / split
    if split == "train":
        return root
    raise DatasetNotFoundError(
        f"no {split!r} split under {root}: expected {root / split}/<class>/<image> (ImageNet layout)"
    )


# ------------------------------------------------------------------------------------------------------------
# Twemoji


class Twemoji(Dataset):
    """Twemoji 64 x 64 colour emoji, classes = Unicode categories of ``emoji.json`` (skin-tone variants included).

    Images by Twitter, Inc. and other contributors (Twemoji), licensed CC-BY 4.0
    (https://creativecommons.org/licenses/by/4.0/); credit Twemoji wherever these images or samples are shown.
    RGBA is composited on white. ``root`` is the folder that ``npm pack`` + ``tar xzf`` produced (holding
    ``package/``) or the ``package`` folder itself. Splits: ``test`` is every 10th image in file-name order,
    ``train`` the rest, ``all`` everything. The 5 ``Component`` swatches are dropped by default (too few for a
    class), which leaves 9 categories.
    """

    name = "twemoji"

    def __init__(
        self, root: str | os.PathLike | None = None, image_size: int = 64, split: str = "all",
        random_flip: bool = False, exclude_categories: Sequence[str] = ("Component",),
    ) -> None:
        if split not in ("train", "test", "all"):
            raise ValueError(f"Twemoji split must be 'train', 'test' or 'all', got {split!r}")
        base = Path(root) if root is not None else default_root(self.name)
        pkg = None
        if base is not None:
            pkg = base if (base / "emoji.json").is_file() else base / "package"
        if pkg is None or not (pkg / "emoji.json").is_file() or not (pkg / "img" / "twitter" / "64").is_dir():
            raise DatasetNotFoundError(
                f"Twemoji not found{f' under {base}' if base else ''}: run `npm pack {TWEMOJI_PACKAGE}` and "
                f"`tar xzf emoji-datasource-twitter-16.0.0.tgz` in a folder, then pass root=<that folder> or put "
                f"it at ${DATA_ENV}/twemoji (CC-BY-4.0, credit Twemoji)"
            )
        self.root, self.split, self.image_size, self.random_flip = pkg, split, int(image_size), random_flip
        img_dir = pkg / "img" / "twitter" / "64"
        with open(pkg / "emoji.json", encoding="utf-8") as f:
            entries = json.load(f)
        category_of: dict[str, str] = {}
        for e in entries:
            cat = e.get("category")
            for v in [e, *(e.get("skin_variations") or {}).values()]:
                if v.get("has_img_twitter") and v.get("image"):
                    category_of[v["image"]] = cat
        files = sorted(f for f, c in category_of.items() if c not in exclude_categories and (img_dir / f).is_file())
        if not files:
            raise DatasetNotFoundError(f"Twemoji at {pkg} lists no images present in {img_dir}")
        self.classes = sorted({category_of[f] for f in files})
        if split != "all":
            files = [f for k, f in enumerate(files) if (k % 10 == 0) == (split == "test")]
        idx = {c: i for i, c in enumerate(self.classes)}
        self.samples = [(img_dir / f, idx[category_of[f]]) for f in files]
        self.labels = np.array([y for _, y in self.samples], dtype=np.int64)
        self.num_classes = len(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def load_image(self, i: int) -> Image.Image:
        with Image.open(self.samples[i][0]) as img:
            rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = self.load_image(i)
        if img.size != (self.image_size, self.image_size):
            img = center_crop_pil(img, self.image_size)
        x = pil_to_tensor(img)
        if self.random_flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x, int(self.samples[i][1])


# ------------------------------------------------------------------------------------------------------------
# In-memory arrays


class ArrayImageDataset(Dataset):
    """uint8 images ``(N, H, W, 3)`` or grey ``(N, H, W)`` with labels, e.g. decoded samples or a test fixture."""

    def __init__(
        self, images: np.ndarray, labels: np.ndarray | Sequence[int], classes: Sequence[str] | None = None,
        name: str = "array", split: str = "all",
    ) -> None:
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] != 3):
            raise ValueError(f"images must be uint8 (N, H, W, 3) or (N, H, W), got {images.dtype} {images.shape}")
        if images.ndim == 3:
            images = np.repeat(images[..., None], 3, axis=-1)
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64)
        if self.labels.shape != (images.shape[0],):
            raise ValueError(f"{self.labels.shape[0]} labels for {images.shape[0]} images")
        self.classes = list(classes) if classes is not None else None
        self.num_classes = len(classes) if classes is not None else int(self.labels.max(initial=-1)) + 1
        self.name, self.split, self.image_size = name, split, int(images.shape[1])
        self.root = None

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = from_uint8(self.images[i])
        return x, int(self.labels[i])

    def load_image(self, i: int) -> Image.Image:
        return Image.fromarray(self.images[i])

    def uint8_images(self, n: int | None = None) -> np.ndarray:
        return self.images[: len(self) if n is None else n]


# ------------------------------------------------------------------------------------------------------------
# Registry and helpers


def build_image_dataset(
    name: str, split: str = "train", image_size: int | None = None, root: str | os.PathLike | None = None, **kw
) -> Dataset:
    """Build a dataset by name ("fashion_mnist", "imagefolder", "twemoji"); ``image_size=None`` -> its default."""
    key = canonical_name(name)
    if key not in DEFAULT_IMAGE_SIZES:
        raise ValueError(f"unknown image dataset {name!r}; choose one of {sorted(DEFAULT_IMAGE_SIZES)}")
    size = DEFAULT_IMAGE_SIZES[key] if image_size is None else int(image_size)
    if key == "fashion_mnist":
        return FashionMNIST(split=split, root=root, image_size=size, **kw)
    if key == "twemoji":
        return Twemoji(root=root, image_size=size, split=split, **kw)
    base = Path(root) if root is not None else default_root(key)
    if base is None:
        raise DatasetNotFoundError(
            f"imagefolder needs root=<folder with train/ and val/ (or class sub-folders)> or ${DATA_ENV}/imagefolder"
        )
    return ImageFolderDataset(resolve_split_folder(base, split), image_size=size, split=split, **kw)


def dataset_to_uint8(ds: Dataset, n: int | None = None) -> np.ndarray:
    """The first ``n`` images (all by default) as (N, H, W, 3) uint8, e.g. an FID reference set."""
    total = len(ds) if n is None else min(int(n), len(ds))
    fast = getattr(ds, "uint8_images", None)
    if callable(fast):
        return fast(total)
    if total == 0:
        raise ValueError("dataset_to_uint8: the dataset is empty")
    first = to_uint8_numpy(ds[0][0])
    out = np.empty((total, *first.shape), dtype=np.uint8)
    out[0] = first
    for i in range(1, total):
        out[i] = to_uint8_numpy(ds[i][0])
    return out
