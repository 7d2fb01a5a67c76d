"""The Vocabulary a GPT is trained on: LlamaGen's flat N-way one, or a coarse k-way one from a token->cluster map.
A head (the ``head=`` config group) names one; :func:`vocabulary_from_config` builds it, caching trees and baseline
mappings by codebook fingerprint so every k of a sweep cuts the same dendrogram.

A head is data (a mapping and member probabilities) plus two small functions: ``encode`` turns fine tokens into the
ids the model sees (inputs and targets), ``decode`` turns sampled ids back into fine tokens for the VQ decoder. The
GPT itself only ever sees ``vocab_size``.

Comparable measurements across heads (docs/method.md section 4):
  * ``fine_nll``: the true negative log-likelihood of the fine tokens under model + decoder. For a coarse head
    ``CE_coarse - log p(y | C(y))``; for the flat head the plain CE.
  * ``marginal_coarse_nll``: a flat model's distribution summed over a mapping's clusters,
    ``-log sum_{t in C(y)} p(t)``, to compare a flat model with a coarse head on the coarse task itself.

Member decoders: ``uniform`` (the paper: a random member of the sampled cluster) and ``frequency`` (member
probability proportional to its count in the training codes plus ``smoothing``; beyond the paper, it avoids emitting
codes the tokenizer never produces).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from masc_llamagen.errors import MascError
from masc_llamagen.masc.linkage import check_k
from masc_llamagen.masc.mappings import LINKAGES, MAPPING_METHODS, build_mapping
from masc_llamagen.masc.members import MemberTable, cluster_members, validate_mapping
from masc_llamagen.masc.tree import build_tree, codebook_sha256, load_tree, save_mapping, verify_fingerprint

LN2 = math.log(2.0)
DECODERS = ("uniform", "frequency")


class HeadError(MascError, ValueError):
    """A head that does not fit the tokenizer or checkpoint in use; the message names both sides."""


@dataclass
class Vocabulary:
    """Flat when ``mapping`` is None (model ids are tokens), coarse otherwise.

    ``mapping``: (N,) int64 in [0, k), every cluster non-empty. ``member_log_prob``: (N,) float64,
    ``log p(t | C(t))`` under the decoder (uniform: ``-log |C(t)|``).
    """

    codebook_size: int
    mapping: torch.Tensor | None = None
    member_log_prob: torch.Tensor | None = None
    name: str = "flat"
    decoder: str = "uniform"

    table: MemberTable | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.mapping is None:
            return
        # The one member table (members of a cluster ascending by token id); the torch tables are views of it.
        self.table = cluster_members(self.mapping.cpu().numpy(), self.codebook_size, source=f"head={self.name} mapping")
        m = self.mapping = torch.from_numpy(self.table.mapping)
        self._order = torch.from_numpy(self.table.members)
        self._start = torch.from_numpy(self.table.offsets)
        sizes = torch.from_numpy(self.table.sizes)
        lp = self.member_log_prob
        if lp is None:
            lp = -torch.log(sizes[m].double())
        self.member_log_prob = lp.double()
        # key[j] = cluster + cumulative member probability within the cluster: increasing over the whole table,
        # so one searchsorted samples every cluster at once.
        cum = self.member_log_prob.exp()[self._order].cumsum(0)
        base = torch.cat([torch.zeros(1, dtype=torch.float64), cum[self._start[1:-1] - 1]])
        within = cum - torch.repeat_interleave(base, sizes)
        self._key = m[self._order].double() + within

    # -- properties ---------------------------------------------------------------------------------------
    @property
    def is_flat(self) -> bool:
        return self.mapping is None

    @property
    def k(self) -> int:
        return self.codebook_size if self.table is None else self.table.k

    @property
    def vocab_size(self) -> int:
        """Rows of the model's token table and head."""
        return self.k

    def sizes(self) -> torch.Tensor:
        if self.is_flat:
            return torch.ones(self.codebook_size, dtype=torch.long)
        return torch.from_numpy(self.table.sizes)

    # -- the two functions ----------------------------------------------------------------------------------
    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Fine tokens -> model ids (inputs and targets)."""
        if self.is_flat:
            return tokens
        return self.mapping.to(tokens.device)[tokens]

    def decode(self, ids: torch.Tensor, generator: torch.Generator | None = None,
               uniforms: torch.Tensor | None = None) -> torch.Tensor:
        """Model ids -> fine tokens on ids' device; coarse ids draw one member each from the decoder's distribution.

        ``uniforms`` (ids' shape, in [0, 1)) pick the members, one per id (the per-sample draws of the sampler).
        Without them they are drawn from ``generator`` on the generator's own device (default: the global RNG on
        ids' device) and moved to ids' device. A member of zero probability is never returned.
        """
        if self.is_flat:
            return ids
        dev = ids.device
        tables = self.__dict__.setdefault("_decode_tables", {})
        if dev not in tables:
            # The CSR tables on ids' device, plus each cluster's first and last member of positive probability:
            # draws are clamped to those, so float rounding at a cluster's edges cannot emit a never-seen code.
            k, n = self.k, self.codebook_size
            pos = self.member_log_prob[self._order] > float("-inf")
            cl, j = self.mapping[self._order], torch.arange(n)
            first = torch.full((k,), n, dtype=torch.long).scatter_reduce(0, cl[pos], j[pos], "amin")
            last = torch.full((k,), -1, dtype=torch.long).scatter_reduce(0, cl[pos], j[pos], "amax")
            first = torch.where(first == n, self._start[:-1], first)
            last = torch.where(last < 0, self._start[1:] - 1, last)
            tables[dev] = tuple(t.to(dev) for t in (self._key, self._order, first, last))
        key, order, first, last = tables[dev]
        flat = ids.reshape(-1)
        if uniforms is None:
            u = torch.rand(flat.shape, generator=generator, dtype=torch.float64,
                           device=generator.device if generator is not None else dev)
        elif uniforms.shape != ids.shape:
            raise HeadError(f"uniforms have shape {tuple(uniforms.shape)}; need ids' shape {tuple(ids.shape)}")
        else:
            u = uniforms.reshape(-1)
        j = torch.searchsorted(key, flat.double() + u.to(dev, torch.float64), right=True)
        j = torch.minimum(torch.maximum(j, first[flat]), last[flat])
        return order[j].reshape(ids.shape)

    # -- likelihoods -------------------------------------------------------------------------------------
    def fine_nll(self, logits: torch.Tensor, fine_targets: torch.Tensor) -> torch.Tensor:
        """Per-token fine NLL in nats for logits over this head's vocabulary (same leading shape as targets)."""
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), self.encode(fine_targets).reshape(-1),
                             reduction="none").reshape(fine_targets.shape)
        if self.is_flat:
            return ce
        return ce - self.member_log_prob.to(ce.device)[fine_targets].to(ce.dtype)

    def to_state(self) -> dict:
        """Plain data for checkpoints (loads with weights_only=True)."""
        out = {"name": self.name, "decoder": self.decoder, "codebook_size": self.codebook_size, "k": self.k}
        if not self.is_flat:
            out["mapping"] = self.mapping.clone()
            out["member_log_prob"] = self.member_log_prob.clone()
        return out

    @classmethod
    def from_state(cls, state: dict) -> Vocabulary:
        voc = cls(codebook_size=int(state["codebook_size"]), mapping=state.get("mapping"),
                  member_log_prob=state.get("member_log_prob"), name=state["name"], decoder=state["decoder"])
        if voc.k != int(state["k"]):
            raise HeadError(f"head state says k={state['k']} but its mapping has {voc.k} clusters; file is corrupt")
        return voc


def marginal_coarse_nll(flat_logits: torch.Tensor, fine_targets: torch.Tensor, mapping: torch.Tensor) -> torch.Tensor:
    """``-log sum_{t in C(y)} p(t)`` per token (nats) for a flat model's logits over N tokens."""
    logits = flat_logits.double()  # float64: -log of a mass near 1 loses most digits in float32
    k = int(mapping.max()) + 1
    m = logits.amax(-1, keepdim=True)
    mass = torch.zeros(*logits.shape[:-1], k, device=logits.device, dtype=torch.float64).index_add_(
        -1, mapping.to(logits.device), (logits - m).exp())
    log_coarse = mass.log() + m - torch.logsumexp(logits, -1, keepdim=True)
    target = mapping.to(fine_targets.device)[fine_targets]
    return -log_coarse.gather(-1, target.unsqueeze(-1)).squeeze(-1).to(flat_logits.dtype)


def member_log_probs(table: MemberTable, decoder: str, counts=None, smoothing: float = 1.0) -> torch.Tensor:
    """``log p(t | C(t))`` (N,) float64 for a decoder; ``counts`` (N,) are token counts in the training codes."""
    if decoder not in DECODERS:
        raise HeadError(f"unknown member decoder {decoder!r}; choose one of {DECODERS}")
    m = torch.from_numpy(table.mapping)
    size = torch.from_numpy(table.sizes).double()
    if decoder == "uniform":
        return -torch.log(size[m])
    if counts is None:
        raise HeadError("the frequency decoder needs token counts from the training codes (CodeDataset.code_counts())")
    c = torch.as_tensor(np.asarray(counts), dtype=torch.float64)
    if c.shape != m.shape or bool((c < 0).any()):
        raise HeadError(f"counts have shape {tuple(c.shape)} (need {tuple(m.shape)}, non-negative)")
    w = c + smoothing
    total = torch.zeros(table.k, dtype=torch.float64).index_add_(0, m, w)
    # A cluster whose members were never seen and no smoothing: fall back to uniform rather than 0/0.
    empty = total[m] == 0
    p = torch.where(empty, 1.0 / size[m], w / total[m].clamp_min(1e-300))
    return p.log()


def build_vocabulary(name: str, codebook_size: int, mapping=None, decoder: str = "uniform", counts=None,
                     smoothing: float = 1.0) -> Vocabulary:
    if name == "flat":
        if mapping is not None:
            raise HeadError("head=flat takes no mapping")
        return Vocabulary(codebook_size=codebook_size, name="flat")
    if mapping is None:
        raise HeadError(f"head={name} needs a token->cluster mapping")
    table = cluster_members(np.asarray(mapping), codebook_size, source=f"head={name} mapping")
    lp = member_log_probs(table, decoder, counts, smoothing)
    return Vocabulary(codebook_size=codebook_size, mapping=torch.from_numpy(table.mapping), member_log_prob=lp,
                      name=name, decoder=decoder)


def bits(nats: torch.Tensor | float) -> torch.Tensor | float:
    return nats / LN2


HEADS = ("flat", *MAPPING_METHODS)


def tree_for(codebook: np.ndarray, method: str, normalize: bool, tree_path: str | None, cache_dir: Path):
    """Load (and verify) or build-and-cache the dendrogram of ``codebook``."""
    if tree_path:
        tree = load_tree(tree_path)
        verify_fingerprint(tree.fingerprint, codebook, source="the tokenizer in use")
        if tree.method != method or tree.normalized != normalize:
            raise HeadError(f"tree {tree_path} was built with method={tree.method}, normalize={tree.normalized} but "
                            f"the head asks for method={method}, normalize={normalize}; rebuild or change the head")
        return tree
    sha = codebook_sha256(np.asarray(codebook, dtype=np.float32))[:16]
    path = Path(cache_dir) / f"tree-{method}-{'l2' if normalize else 'raw'}-{sha}.npz"
    if path.is_file():
        tree = load_tree(path)
        verify_fingerprint(tree.fingerprint, codebook, source="the tokenizer in use")
        return tree
    tree = build_tree(codebook, normalize=normalize, method=method)
    tree.save(path)
    return tree


def mapping_for(codebook: np.ndarray, method: str, k: int, seed: int, normalize: bool, cache_dir: Path) -> np.ndarray:
    """Baseline mappings (k-means takes minutes at N = 16384) are computed once per codebook and cached."""
    sha = codebook_sha256(np.asarray(codebook, dtype=np.float32))[:16]
    path = Path(cache_dir) / f"mapping-{method}-k{k}-seed{seed}-{'l2' if normalize else 'raw'}-{sha}.npy"
    if path.is_file():
        return validate_mapping(np.load(path, allow_pickle=False), int(codebook.shape[0]), k, source=str(path))
    mapping = build_mapping(method, codebook, k, seed=seed, normalize=normalize)
    save_mapping(path, mapping)
    return mapping


def vocabulary_from_config(head: Any, codebook: np.ndarray, counts: np.ndarray | None,
                           cache_dir: Path) -> tuple[Vocabulary, dict]:
    """(Vocabulary, provenance dict) for a head config (name, k, decoder, smoothing, normalize, seed, tree)."""
    name = head.name
    n = int(codebook.shape[0])
    if name not in HEADS:
        raise HeadError(f"unknown head {name!r}; choose one of {', '.join(HEADS)}")
    info: dict = {"head": name, "codebook_sha256": codebook_sha256(np.asarray(codebook, dtype=np.float32))}
    if name == "flat":
        return build_vocabulary("flat", n), info
    k = check_k(head.k, n)
    if name == "masc" or name in LINKAGES:
        method = "average" if name == "masc" else name
        tree = tree_for(codebook, method, head.normalize, head.tree, cache_dir)
        mapping = tree.mapping(k)
        info.update(tree_method=method, tree_normalized=tree.normalized)
    else:
        mapping = mapping_for(codebook, name, k, head.seed, head.normalize, cache_dir)
        info.update(seed=head.seed, normalized=head.normalize)
    voc = build_vocabulary(name, n, mapping, decoder=head.decoder, counts=counts, smoothing=head.smoothing)
    info.update(k=k, decoder=head.decoder)
    return voc, info
