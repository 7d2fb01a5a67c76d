"""The likelihood view of a checkpoint on held-out codes: coarse CE, fine NLL per member decoder, a flat model's CE
marginalised onto coarse clusters, and predictive entropy; one function that training, the pipeline and the
benchmarks all call, so their numbers mean the same thing."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F

from masc_llamagen.masc.vocabulary import Vocabulary, bits, marginal_coarse_nll


def normalized_entropy(logits: torch.Tensor) -> torch.Tensor:
    """H / log V of each predictive distribution (0: certain, 1: uniform)."""
    logp = torch.log_softmax(logits.float(), -1)
    return -(logp.exp() * logp).sum(-1) / math.log(logits.shape[-1])


@torch.no_grad()
def heldout_diagnostics(model: torch.nn.Module, vocabs: Mapping[str, Vocabulary], codes: torch.Tensor,
                        cond: torch.Tensor, mappings: Mapping[str, torch.Tensor] | None = None, batch: int = 250,
                        **cond_kwargs: torch.Tensor) -> dict[str, float]:
    """Per-token averages over ``codes`` (N, L) fine tokens with their conditions ``cond`` (class ids or caption
    features; t2i masks as ``cond_kwargs``), in bits, except ``entropy_norm``.

    ``vocabs``: the checkpoint's head under each member decoder to score (``fine_nll_<name>``); all must share the
    coarse mapping, the first one encodes targets. ``mappings``: label -> (N,) mapping for ``marginal_ce/<label>``.
    """
    device = next(model.parameters()).device
    encoder = next(iter(vocabs.values()))
    sums: dict[str, float] = {}

    def add(key: str, value: torch.Tensor) -> None:
        sums[key] = sums.get(key, 0.0) + value.sum().item()

    for s in range(0, len(codes), batch):
        fine = codes[s : s + batch].to(device)
        kw = {k: v[s : s + batch].to(device) for k, v in cond_kwargs.items()}
        ids = encoder.encode(fine)
        logits = model(ids[:, :-1], cond[s : s + batch].to(device), **kw)[0].float()
        logp = logits.log_softmax(-1)
        add("coarse_ce", F.cross_entropy(logp.reshape(-1, logp.shape[-1]), ids.reshape(-1), reduction="sum"))
        add("entropy_norm", normalized_entropy(logits))
        for name, v in vocabs.items():
            add(f"fine_nll_{name}", v.fine_nll(logits, fine))
        for label, mapping in (mappings or {}).items():
            add(f"marginal_ce/{label}", marginal_coarse_nll(logits, fine, mapping.to(device)))
    n_tok = codes.numel()
    out = {k: (v / n_tok if k == "entropy_norm" else bits(v / n_tok)) for k, v in sums.items()}
    if encoder.is_flat:  # the fine token is the coarse one: every decoder's NLL is the CE
        out.update({f"fine_nll_{name}": out["coarse_ce"] for name in vocabs})
    return out | {"tokens": n_tok}
