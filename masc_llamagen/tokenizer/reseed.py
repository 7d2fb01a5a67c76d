"""Dead-code re-seeding, ours: MASC clusters the *whole* codebook, so a code no image uses would be a cluster member
with no meaning. Codes that no training assignment hit since the previous check are moved onto randomly chosen
(L2-normalised, as the quantiser sees them) encoder outputs of the current batch, so the nearest-neighbour search
starts using them at once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from masc_llamagen.tokenizer.vq import VectorQuantizer


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
