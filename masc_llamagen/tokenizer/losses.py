"""The optional loss terms of tokenizer training: a pluggable perceptual distance and a PatchGAN with hinge loss.

Both are off by default (their pretrained networks cannot be fetched here); upstream LlamaGen uses LPIPS and a
PatchGAN at weight 0.5 from step 20k.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from masc_llamagen.errors import ConfigError


class PerceptualUnavailableError(ConfigError):
    """perceptual_weight > 0 but the chosen perceptual network has no weights on this machine."""


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
            "masc_llamagen.tokenizer.losses.register_perceptual"
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
