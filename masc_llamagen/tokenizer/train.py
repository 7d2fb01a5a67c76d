"""Train LlamaGen's VQ tokenizer on an image dataset, then score it on held-out images.

    python -m masc_llamagen.tokenizer.train [steps=3000 vq.arch=VQ-small force=true ...]   (configs/vq_train.yaml)

or, from Python, ``train_tokenizer({"steps": 500, "out": "..."})`` (keys not given take the YAML's defaults).

Losses are upstream's: L2 reconstruction + codebook + beta-weighted commitment (+ the optional entropy term), with
the perceptual (LPIPS-like) and PatchGAN hinge terms pluggable but off by default, since their pretrained networks
cannot be fetched here. Two things are ours:

* Dead-code re-seeding. MASC clusters the *whole* codebook, so a code that no image uses would be a cluster member
  with no meaning. Every ``reseed_every`` steps, each code that no training assignment hit since the previous check
  is moved onto a randomly chosen (L2-normalised, as the quantiser sees it) encoder output of the current batch, and
  its Adam moments are zeroed. A re-seeded code sits exactly on real data, so the nearest-neighbour search starts
  using it at once; the check runs only between steps, never in the last ``reseed_every`` steps, so the decoder
  always gets time to learn the codes it will be scored with.
* Skip-if-up-to-date. The weights go to ``out`` (self-describing safetensors, so ``load_vq(out)`` and ``tree build``
  take it as is) and a report to ``<out>.json`` holding the config and the weights' SHA-256. A later call with the
  same config returns that report without training (``force=true`` retrains).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections import deque
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import hydra
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader, Subset

from masc_llamagen.checkpoint import save_weights
from masc_llamagen.errors import MascError
from masc_llamagen.utils.io import atomic_write_json
from masc_llamagen.tokenizer.metrics import codebook_stats, images_to_uint8, psnr, ssim
from masc_llamagen.tokenizer.vq import VectorQuantizer, VQConfig, VQModel, get_vq_config

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
CONFIG_NAME = "vq_train"
RUNTIME_KEYS = ("force", "progress")  # do not change the result, so they are not part of the up-to-date check
PSNR_CAP_DB = 100.0  # identical images have infinite PSNR; capped so the JSON report stays valid
FINAL_LOSS_WINDOW = 50  # "final" losses are means over the last steps, not one noisy batch


class TokenizerTrainError(MascError, ValueError):
    """A tokenizer-training setting that cannot work as given; the message says what to change."""


class PerceptualUnavailableError(TokenizerTrainError):
    """perceptual_weight > 0 but the chosen perceptual network has no weights on this machine."""


# ----------------------------------------------------------------------------------------------------------------
# Config


def default_config() -> DictConfig:
    """configs/vq_train.yaml without its Hydra parts, in struct mode: a misspelt key fails, not ignored."""
    cfg = OmegaConf.load(CONFIG_DIR / f"{CONFIG_NAME}.yaml")
    for key in ("defaults", "hydra"):
        cfg.pop(key, None)
    OmegaConf.set_struct(cfg, True)
    return cfg


def resolve_config(cfg: Mapping[str, Any] | DictConfig | None = None) -> DictConfig:
    """The YAML defaults overlaid with ``cfg`` (a partial dict is fine), interpolations resolved.

    ``vq.overrides`` stays open: it takes any VQConfig field, checked when the model is built.
    """
    base = default_config()
    if cfg is not None:
        user = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(dict(cfg))
        OmegaConf.set_struct(base.vq.overrides, False)
        try:
            base = OmegaConf.merge(base, user)
        except Exception as e:  # omegaconf's ConfigKeyError etc.: one line naming the bad key
            raise TokenizerTrainError(f"bad tokenizer-training config: {str(e).splitlines()[0]}") from None
    OmegaConf.resolve(base)
    return base


def build_vq_config(vq: Mapping[str, Any]) -> VQConfig:
    """A VQConfig from the ``vq`` block: registry arch, then the explicit fields, then free-form overrides."""
    d = get_vq_config(vq["arch"]).to_dict()
    for key in ("codebook_size", "codebook_embed_dim"):
        if vq.get(key) is not None:
            d[key] = int(vq[key])
    d["commit_loss_beta"] = float(vq["commit_loss_beta"])
    d["entropy_loss_ratio"] = float(vq["entropy_loss_ratio"])
    d.update(dict(vq.get("overrides") or {}))
    return VQConfig.from_dict(d)


def _config_record(cfg: DictConfig) -> dict:
    """The config as plain JSON data, without runtime-only keys: what the up-to-date check compares."""
    d = OmegaConf.to_container(cfg, resolve=True)
    for key in RUNTIME_KEYS:
        d.pop(key, None)
    return json.loads(json.dumps(d))


# ----------------------------------------------------------------------------------------------------------------
# Optional loss terms


PerceptualFactory = Callable[[DictConfig], nn.Module]
PERCEPTUAL_LOSSES: dict[str, PerceptualFactory] = {}


def register_perceptual(name: str) -> Callable[[PerceptualFactory], PerceptualFactory]:
    """Register ``factory(cfg) -> module(recon, target) -> scalar`` under ``name`` (images in [-1, 1]).

    A factory must raise PerceptualUnavailableError (one line, saying what file to provide) when its weights are
    missing, so enabling the term on a machine without them fails before training starts.
    """

    def add(factory: PerceptualFactory) -> PerceptualFactory:
        PERCEPTUAL_LOSSES[name] = factory
        return factory

    return add


def build_perceptual(cfg: DictConfig) -> nn.Module:
    name = cfg.perceptual
    if name not in PERCEPTUAL_LOSSES:
        raise PerceptualUnavailableError(
            f"perceptual={name!r} is not registered; choose one of {sorted(PERCEPTUAL_LOSSES)} or add one with "
            "masc_llamagen.tokenizer.train.register_perceptual"
        )
    module = PERCEPTUAL_LOSSES[name](cfg)
    module.eval().requires_grad_(False)
    return module


VGG16_FILE = "vgg16-397923af.pth"  # torchvision's ImageNet VGG16 weights file name
VGG16_TAPS = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in torchvision's vgg16().features


class VGGPerceptual(nn.Module):
    """LPIPS-style distance without LPIPS's learned channel weights: unit-normalise each VGG16 tap's channel vector,
    average the squared difference over positions and channels, sum over taps. Any pretrained VGG16 works, and no
    second weights file (LPIPS's linear heads) is needed."""

    def __init__(self, features: nn.Sequential) -> None:
        super().__init__()
        self.features = features[: VGG16_TAPS[-1] + 1]
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = ((x + 1) / 2 - self.mean) / self.std
        out = []
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in VGG16_TAPS:
                out.append(F.normalize(h, dim=1, eps=1e-10))
        return out

    def forward(self, recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return sum((a - b).pow(2).mean() for a, b in zip(self._taps(recon), self._taps(target), strict=True))


@register_perceptual("vgg16")
def _vgg16_perceptual(cfg: DictConfig) -> nn.Module:
    given = cfg.get("perceptual_weights")
    path = Path(given) if given else Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILE
    if not path.is_file():
        raise PerceptualUnavailableError(
            f"perceptual_weight={cfg.perceptual_weight} needs pretrained VGG16 weights, but {path} does not exist: "
            f"pass perceptual_weights=<torchvision {VGG16_FILE}>, register another net with register_perceptual, "
            "or set perceptual_weight=0"
        )
    from torchvision.models import vgg16

    net = vgg16(weights=None)
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    net.load_state_dict(state.get("state_dict", state) if isinstance(state, Mapping) else state)
    return VGGPerceptual(net.features)


class PatchDiscriminator(nn.Module):
    """PatchGAN: stride-2 4x4 convs then stride-1 ones to a 1-channel logit map, each logit judging one patch.

    BatchNorm and N(0, 0.02) init follow the usual PatchGAN recipe; ``n_layers`` sets the patch size (2 suits
    32 px images, 3 the 256 px ones upstream trains on).
    """

    def __init__(self, in_ch: int = 3, ch: int = 64, n_layers: int = 2) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_ch, ch, 4, 2, 1), nn.LeakyReLU(0.2, inplace=True)]
        width = ch
        for i in range(1, n_layers + 1):
            nxt = ch * min(2**i, 8)
            stride = 2 if i < n_layers else 1
            layers += [nn.Conv2d(width, nxt, 4, stride, 1, bias=False), nn.BatchNorm2d(nxt),
                       nn.LeakyReLU(0.2, inplace=True)]
            width = nxt
        layers.append(nn.Conv2d(width, 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss: push real logits above +1 and fake ones below -1."""
    return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())


def adaptive_gan_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
    """|grad rec| / |grad gan| at the decoder's last layer, so the GAN term never swamps reconstruction."""
    g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_gan = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (g_rec.norm() / (g_gan.norm() + 1e-4)).clamp(0.0, 1e4).detach()


# ----------------------------------------------------------------------------------------------------------------
# Dead-code re-seeding


@torch.no_grad()
def reseed_dead_codes(
    quantizer: VectorQuantizer,
    latents: torch.Tensor,
    dead: torch.Tensor,
    generator: torch.Generator | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> int:
    """Move the codes flagged in ``dead`` (bool, one per code) onto random encoder outputs; returns how many moved.

    ``latents`` are the pre-quantisation latents ``(B, C, h, w)`` (``quant_conv`` output) of the current batch;
    they are L2-normalised first when the quantiser searches on the sphere. Distinct positions are drawn while the
    batch has enough; beyond that, repeats get a little noise so they do not stay identical. The codes' Adam
    moments are zeroed, so stale statistics do not drag them off their new place.
    """
    dead_idx = dead.nonzero().flatten()
    n = int(dead_idx.numel())
    if n == 0:
        return 0
    weight = quantizer.embedding.weight
    z = latents.detach().permute(0, 2, 3, 1).reshape(-1, latents.shape[1]).float()
    if quantizer.l2_norm:
        z = F.normalize(z, dim=-1)
    m = z.shape[0]
    if n <= m:
        pick = torch.randperm(m, generator=generator)[:n]
        new = z[pick.to(z.device)]
    else:
        pick = torch.randint(0, m, (n,), generator=generator)
        noise = torch.randn(n, z.shape[1], generator=generator).to(z.device) * 1e-3
        new = z[pick.to(z.device)] + noise
        if quantizer.l2_norm:
            new = F.normalize(new, dim=-1)
    weight[dead_idx.to(weight.device)] = new.to(weight.dtype)
    if optimizer is not None:
        state = optimizer.state.get(weight, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                state[key][dead_idx.to(weight.device)] = 0.0
    return n


# ----------------------------------------------------------------------------------------------------------------
# Held-out evaluation


@torch.no_grad()
def evaluate_reconstruction(
    model: VQModel,
    dataset,
    eval_images: int,
    rfid_images: int = 0,
    batch_size: int = 250,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> dict[str, Any]:
    """PSNR/SSIM (means over images, on uint8), codebook usage and perplexity of the held-out codes, and rFID.

    Usage is the fraction of the N codes that encoding the first ``eval_images`` held-out images hits at least once.
    rFID compares reconstructions with originals on the first ``rfid_images`` through
    ``masc_llamagen.eval.metrics.compute_metrics`` when that (and the Inception weights) are available; otherwise
    ``rfid`` is None and ``rfid_note`` says why.
    """
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    n_eval = min(int(eval_images), len(dataset))
    n_rfid = min(int(rfid_images), len(dataset))
    total = max(n_eval, n_rfid)
    counts = torch.zeros(model.codebook_size, dtype=torch.long)
    psnrs, ssims, origs, recons = [], [], [], []
    loader = DataLoader(Subset(dataset, range(total)), batch_size=batch_size, shuffle=False)
    seen = 0
    for x, _ in tqdm(loader, desc="tokenizer eval", disable=not progress, leave=False):
        x = x.to(device)
        idx = model.encode(x)
        a = images_to_uint8(x).cpu()
        b = images_to_uint8(model.decode_code(idx)).cpu()
        k = max(0, min(len(x), n_eval - seen))
        if k:
            counts += torch.bincount(idx[:k].flatten().cpu(), minlength=model.codebook_size)
            psnrs.append(psnr(a[:k], b[:k]).clamp(max=PSNR_CAP_DB))
            ssims.append(ssim(a[:k], b[:k]))
        r = max(0, min(len(x), n_rfid - seen))
        if r:
            origs.append(a[:r])
            recons.append(b[:r])
        seen += len(x)
    model.train(was_training)
    out: dict[str, Any] = {
        "heldout_images": n_eval,
        "psnr": float(torch.cat(psnrs).mean()) if psnrs else None,
        "ssim": float(torch.cat(ssims).mean()) if ssims else None,
        **codebook_stats(counts),
        "rfid": None,
        "rfid_images": n_rfid,
    }
    if n_rfid <= 0:
        out["rfid_note"] = "skipped: rfid_images=0"
        return out
    try:
        from masc_llamagen.eval.metrics import compute_metrics
    except ImportError as e:
        out["rfid_note"] = f"skipped: masc_llamagen.eval.metrics.compute_metrics is not available ({e})"
        return out
    t0 = time.time()
    dev = str(device)
    try:
        res = compute_metrics(torch.cat(recons).numpy(), torch.cat(origs).numpy(),
                              device="cuda" if dev.startswith("cuda") else "cpu")
    except (ImportError, OSError, RuntimeError, ValueError) as e:  # missing weights / torch-fidelity: say so
        out["rfid_note"] = f"skipped: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        return out
    out["rfid"] = float(res["fid"])
    out["rfid_time_s"] = round(time.time() - t0, 1)
    out["rfid_note"] = (f"FID of {n_rfid} reconstructions vs their originals ({res.get('feature_extractor', '')}, "
                        f"layer {res.get('feature_layer', '2048')}); few images bias FID upwards")
    return out


# ----------------------------------------------------------------------------------------------------------------
# Training


def _lr_factor(step: int, steps: int, warmup: int, min_ratio: float) -> float:
    """Linear warmup, then cosine decay from 1 to ``min_ratio`` (a few-minute run needs its lr annealed)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(1, steps - warmup)
    t = min(1.0, (step - warmup) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _report_path(out: Path) -> Path:
    return out.with_name(out.name + ".json")


def up_to_date_report(cfg: Mapping[str, Any] | DictConfig | None = None) -> dict | None:
    """The existing report when ``out`` and ``<out>.json`` hold exactly this config's result, else None."""
    cfg = resolve_config(cfg)
    out = Path(cfg.out)
    report_path = _report_path(out)
    if not (out.is_file() and report_path.is_file()):
        return None
    try:
        report = json.loads(report_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if report.get("config") != _config_record(cfg) or report.get("weights_sha256") != _sha256(out):
        return None
    return report


def _pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TokenizerTrainError(f"device={name} asked for but CUDA is not available; use device=cpu")
    return torch.device(name)


def _infinite(loader: DataLoader):
    while True:
        yield from loader


def _check(cfg: DictConfig) -> None:
    if cfg.steps < 1 or cfg.batch_size < 1 or cfg.eval_batch_size < 1:
        raise TokenizerTrainError("steps, batch_size and eval_batch_size must be >= 1")
    if cfg.recon_loss not in ("l2", "l1"):
        raise TokenizerTrainError(f"recon_loss={cfg.recon_loss!r}; use l2 (upstream) or l1")
    if cfg.reseed_every < 0 or cfg.eval_images < 0 or cfg.rfid_images < 0:
        raise TokenizerTrainError("reseed_every, eval_images and rfid_images must be >= 0")
    if len(cfg.betas) != 2:
        raise TokenizerTrainError(f"betas must be two numbers, e.g. [0.9, 0.95], got {list(cfg.betas)}")


def train_tokenizer(cfg: Mapping[str, Any] | DictConfig | None = None) -> dict[str, Any]:
    """Train (or reuse) a VQ tokenizer; returns the report also written to ``<out>.json``.

    ``cfg`` overlays configs/vq_train.yaml (a partial dict is enough). The returned dict has ``skipped=True`` when
    an up-to-date result was reused.
    """
    cfg = resolve_config(cfg)
    _check(cfg)
    out = Path(cfg.out)
    if not cfg.force:
        report = up_to_date_report(cfg)
        if report is not None:
            return {**report, "skipped": True}

    threads = torch.get_num_threads()
    if cfg.num_threads:
        torch.set_num_threads(int(cfg.num_threads))
    try:
        return _train(cfg, out)
    finally:
        torch.set_num_threads(threads)  # a library call must not leave the process's thread count changed


def _train(cfg: DictConfig, out: Path) -> dict[str, Any]:
    from tqdm.auto import tqdm

    from masc_llamagen.data.images import build_image_dataset, heldout_split

    t_start = time.time()
    load_start = os.getloadavg()
    device = _pick_device(str(cfg.device))
    vq_config = build_vq_config(cfg.vq)
    use_perceptual = cfg.perceptual_weight > 0
    perceptual = build_perceptual(cfg).to(device) if use_perceptual else None  # fail before any data is read

    data = cfg.data
    train_set = build_image_dataset(data.name, data.split, image_size=data.image_size, root=data.root,
                                    random_flip=bool(data.random_flip))
    held_split = data.heldout_split or heldout_split(data.name)
    held_set = build_image_dataset(data.name, held_split, image_size=data.image_size, root=data.root)

    torch.manual_seed(int(cfg.seed))
    model = VQModel(vq_config).to(device)
    model.num_tokens_hw(int(data.image_size))  # fails now, with the reason, if the size does not fit the arch
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: _lr_factor(s, int(cfg.steps), int(cfg.warmup_steps), float(cfg.min_lr_ratio)))

    use_gan = cfg.adversarial_weight > 0
    disc = disc_opt = None
    if use_gan:
        disc = PatchDiscriminator(vq_config.in_channels, int(cfg.disc_ch), int(cfg.disc_layers)).to(device).train()
        disc_opt = torch.optim.Adam(disc.parameters(), lr=cfg.disc_lr or cfg.lr, betas=tuple(cfg.betas))

    gen = torch.Generator().manual_seed(int(cfg.seed))
    reseed_gen = torch.Generator().manual_seed(int(cfg.seed) + 1)
    loader = DataLoader(train_set, batch_size=int(cfg.batch_size), shuffle=True, drop_last=True, generator=gen,
                        num_workers=int(data.num_workers))
    if len(loader) == 0:
        raise TokenizerTrainError(f"{len(train_set)} training images are fewer than batch_size={cfg.batch_size}")
    batches = _infinite(loader)

    k = vq_config.codebook_size
    counts = torch.zeros(k, dtype=torch.long, device=device)  # assignments since the last dead-code check
    history: dict[str, deque] = {}
    reseeded_total, reseed_events = 0, 0
    steps = int(cfg.steps)
    bar = tqdm(total=steps, desc="tokenizer", disable=not cfg.progress)
    t_train = time.time()
    for step in range(steps):
        x, _ = next(batches)
        x = x.to(device, non_blocking=True)
        latents = model.quant_conv(model.encoder(x))
        zq, idx, q = model.quantize(latents)
        recon = model.decode(zq)
        counts += torch.bincount(idx.flatten(), minlength=k)

        rec = F.mse_loss(recon, x) if cfg.recon_loss == "l2" else F.l1_loss(recon, x)
        terms = {"recon": rec, "codebook": q.codebook_loss, "commit": q.commit_loss, "entropy": q.entropy_loss}
        nll = rec
        if perceptual is not None:
            terms["perceptual"] = perceptual(recon, x)
            nll = nll + cfg.perceptual_weight * terms["perceptual"]
        loss = nll + cfg.codebook_weight * (q.codebook_loss + q.commit_loss + q.entropy_loss)
        gan_on = use_gan and step >= cfg.disc_start
        if gan_on:
            disc.requires_grad_(False)
            g_loss = -disc(recon).mean()
            disc.requires_grad_(True)
            w = adaptive_gan_weight(nll, g_loss, model.last_layer) if cfg.disc_adaptive_weight else 1.0
            terms["g_adv"] = g_loss
            loss = loss + cfg.adversarial_weight * w * g_loss
        terms["total"] = loss

        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()

        if gan_on:
            d_loss = hinge_d_loss(disc(x), disc(recon.detach()))
            disc_opt.zero_grad(set_to_none=True)
            d_loss.backward()
            disc_opt.step()
            terms["d_adv"] = d_loss

        if cfg.reseed_every and (step + 1) % cfg.reseed_every == 0 and step + 1 + cfg.reseed_every <= steps:
            n = reseed_dead_codes(model.quantize, latents, counts == 0, reseed_gen, opt)
            reseeded_total += n
            reseed_events += int(n > 0)
            counts.zero_()

        for name, v in terms.items():
            history.setdefault(name, deque(maxlen=FINAL_LOSS_WINDOW)).append(float(v.detach()))
        bar.update(1)
        if step % 10 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{loss.item():.4f}", rec=f"{rec.item():.4f}", usage=f"{float(q.codebook_usage):.2f}",
                            lr=f"{sched.get_last_lr()[0]:.1e}")
    bar.close()
    train_time = time.time() - t_train
    train_usage = model.codebook_usage()

    t_eval = time.time()
    metrics = evaluate_reconstruction(model, held_set, int(cfg.eval_images), int(cfg.rfid_images),
                                      int(cfg.eval_batch_size), device, progress=bool(cfg.progress))
    eval_time = time.time() - t_eval

    model.cpu().eval()
    save_weights(out, model, vq_config, kind="vq")
    report = {
        "config": _config_record(cfg),
        "vq_config": vq_config.to_dict(),
        "out": str(out),
        "weights_sha256": _sha256(out),
        "parameters": sum(p.numel() for p in model.parameters()),
        "dataset": {"name": data.name, "train_split": data.split, "train_images": len(train_set),
                    "heldout_split": held_split, "image_size": int(data.image_size)},
        "steps": steps,
        "images_seen": steps * int(cfg.batch_size),
        "wall_time_s": round(time.time() - t_start, 1),
        "train_time_s": round(train_time, 1),
        "eval_time_s": round(eval_time, 1),
        "train_images_per_s": round(steps * int(cfg.batch_size) / train_time, 1),
        "final_losses": {name: sum(v) / len(v) for name, v in history.items()},
        "final_losses_window": min(FINAL_LOSS_WINDOW, steps),
        "train_codebook_usage_window": train_usage,
        "reseeded_codes_total": reseeded_total,
        "reseed_events": reseed_events,
        **metrics,
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "load_average_start_end": [round(load_start[0], 2), round(os.getloadavg()[0], 2)],
        "cpu_count": os.cpu_count(),
        "torch_version": torch.__version__,
        "perceptual": cfg.perceptual if use_perceptual else None,
        "adversarial": use_gan,
    }
    report_path = _report_path(out)
    atomic_write_json(report_path, report)
    return {**report, "skipped": False}


def summary(report: Mapping[str, Any]) -> str:
    """One line with the numbers that matter."""
    def f(v, fmt):
        return "n/a" if v is None else format(v, fmt)

    head = "up to date" if report.get("skipped") else f"trained {report['steps']} steps in {report['wall_time_s']} s"
    return (f"tokenizer {report['out']}: {head}; held-out PSNR {f(report.get('psnr'), '.2f')} dB, "
            f"SSIM {f(report.get('ssim'), '.4f')}, codebook usage {f(report.get('codebook_usage'), '.1%')}, "
            f"perplexity {f(report.get('perplexity'), '.0f')}, rFID {f(report.get('rfid'), '.2f')}")


@hydra.main(version_base="1.3", config_path="../../configs", config_name=CONFIG_NAME)
def main(cfg: DictConfig) -> None:
    try:
        report = train_tokenizer(cfg)
    except (TokenizerTrainError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    print(summary(report))
    if report.get("rfid") is None:
        print(f"rFID {report.get('rfid_note')}")


if __name__ == "__main__":
    main()
