"""LlamaGen's class-conditional GPT, weight-compatible with the released checkpoints.

The state-dict keys, shapes and parameter counts equal upstream's for every released config (tested against
``tests/fixtures/llamagen/shapes.json``). The vocabulary size is a plain parameter: MASC swaps the N-way token
table and head for k-way ones and nothing else changes. The model knows nothing of heads, Hydra or W&B.

Two details the released weights depend on, reproduced exactly:
  * 2-D RoPE where the class position gets all-zero rotation rows (not the identity): its q and k vanish, so the
    class reaches the image tokens only through the attention values;
  * RMSNorm computed in float32, logits returned in float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class GPTConfig:
    """Architecture of one GPT; field names follow upstream's ``ModelArgs`` so its JSON configs load as is."""

    dim: int = 768
    n_layer: int = 12
    n_head: int = 12
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    initializer_range: float = 0.02
    token_dropout_p: float = 0.1
    attn_dropout_p: float = 0.0
    resid_dropout_p: float = 0.1
    ffn_dropout_p: float = 0.1
    num_classes: int = 1000
    class_dropout_prob: float = 0.1
    model_type: str = "c2i"
    vocab_size: int = 16384
    cls_token_num: int = 1
    block_size: int = 256
    zero_init_head: bool = True  # LlamaGen zero-inits its head; MASC's coarse heads use N(0, 0.02)
    # The null-class row CFG samples with. None: upstream's rule (present iff class_dropout_prob > 0), which the
    # released files follow; our training sets True, so CFG never depends on a dropout setting.
    null_class: bool | None = None

    def __post_init__(self) -> None:
        if self.model_type != "c2i":
            raise ValueError(f"model_type={self.model_type!r} is not supported; only class-conditional 'c2i' is")
        if self.dim % self.n_head:
            raise ValueError(f"dim={self.dim} is not divisible by n_head={self.n_head}; pick compatible sizes")
        if (self.dim // self.n_head) % 4:
            raise ValueError(f"head dim {self.dim // self.n_head} must be a multiple of 4 for 2-D RoPE")
        side = math.isqrt(self.block_size)
        if side * side != self.block_size:
            raise ValueError(f"block_size={self.block_size} must be a square (grid side^2), e.g. 256 for 16x16")
        if self.vocab_size < 1 or self.num_classes < 1:
            raise ValueError(f"vocab_size ({self.vocab_size}) and num_classes ({self.num_classes}) must be >= 1")
        if self.null_class is False and self.class_dropout_prob > 0:
            raise ValueError("class dropout swaps in the null class: null_class=False needs class_dropout_prob=0")
        if self.cls_token_num != 1:
            raise ValueError("cls_token_num must be 1 for class-conditional models")

    @property
    def has_null_class(self) -> bool:
        return self.class_dropout_prob > 0 if self.null_class is None else bool(self.null_class)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def grid_size(self) -> int:
        return math.isqrt(self.block_size)

    @property
    def ffn_hidden(self) -> int:
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)

    @classmethod
    def from_dict(cls, d: dict) -> GPTConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown GPT config keys {unknown}; valid keys are {sorted(known)}")
        return cls(**d)


# Released sizes (upstream's GPT_* registry) and CPU-sized configs for tests, tutorials and benchmarks.
GPT_CONFIGS: dict[str, dict] = {
    "GPT-B": dict(n_layer=12, n_head=12, dim=768),
    "GPT-L": dict(n_layer=24, n_head=16, dim=1024),
    "GPT-XL": dict(n_layer=36, n_head=20, dim=1280),
    "GPT-XXL": dict(n_layer=48, n_head=24, dim=1536),
    "GPT-XXXL": dict(n_layer=48, n_head=40, dim=2560),
    "GPT-3B": dict(n_layer=24, n_head=32, dim=3200),
    # CPU-sized: ~0.4M / ~2M / ~6M parameters at vocab 1024.
    "GPT-nano": dict(n_layer=2, n_head=4, dim=64),
    "GPT-micro": dict(n_layer=4, n_head=4, dim=128),
    "GPT-mini": dict(n_layer=6, n_head=6, dim=192),
}


def gpt_config(name: str, **overrides) -> GPTConfig:
    """A registry config with overrides (vocab_size, block_size, num_classes, dropouts ...)."""
    if name not in GPT_CONFIGS:
        raise ValueError(f"unknown GPT config {name!r}; choose one of {sorted(GPT_CONFIGS)}")
    return GPTConfig(**{**GPT_CONFIGS[name], **overrides})


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def rope_2d_table(cfg: GPTConfig) -> torch.Tensor:
    """(cls_token_num + grid^2, head_dim/2, 2) table of (cos, sin); the class rows are zeros on purpose."""
    g, hd = cfg.grid_size, cfg.head_dim
    half = hd // 2
    inv_freq = 1.0 / (cfg.rope_base ** (torch.arange(0, half, 2, dtype=torch.float32)[: half // 2] / half))
    angles = torch.outer(torch.arange(g, dtype=torch.float32), inv_freq)  # (g, hd/4)
    rows = angles[:, None, :].expand(g, g, -1)  # first half of the pairs: row index
    cols = angles[None, :, :].expand(g, g, -1)  # second half: column index
    grid = torch.cat([rows, cols], dim=-1).reshape(g * g, half)
    table = torch.stack([torch.cos(grid), torch.sin(grid)], dim=-1)
    return torch.cat([torch.zeros(cfg.cls_token_num, half, 2), table], dim=0)


def apply_rope(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs of x (B, S, H, hd) by table (S, hd/2, 2) or (B, S, hd/2, 2)."""
    xp = x.float().reshape(*x.shape[:-1], -1, 2)
    t = table.unsqueeze(-3) if table.dim() == 4 else table[None, :, None]
    cos, sin = t[..., 0], t[..., 1]
    out = torch.stack([xp[..., 0] * cos - xp[..., 1] * sin, xp[..., 1] * cos + xp[..., 0] * sin], dim=-1)
    return out.flatten(-2).type_as(x)


class KVCache:
    """Static per-layer key/value buffers (batch, heads, max_len rounded up to 8, head_dim); not in state_dict."""

    def __init__(self, batch: int, n_head: int, max_len: int, head_dim: int, dtype, device):
        length = 8 * math.ceil(max_len / 8)
        self.k = torch.zeros(batch, n_head, length, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)

    def update(self, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, end: int):
        # A smaller batch writes the leading rows: CFG keeps its conditional half first, so after the CFG
        # interval the sampler can run the conditional half alone.
        b = k.shape[0]
        self.k[:b, :, pos] = k
        self.v[:b, :, pos] = v
        return self.k[:b, :, :end], self.v[:b, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        self.wqkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.attn_dropout_p = cfg.attn_dropout_p
        self.resid_dropout = nn.Dropout(cfg.resid_dropout_p)
        self.kv_cache: KVCache | None = None

    def forward(self, x, rope, pos: torch.Tensor | None = None, end: int | None = None, mask=None):
        b, s, _ = x.shape
        q, k, v = self.wqkv(x).view(b, s, 3, self.n_head, self.head_dim).unbind(2)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if self.kv_cache is not None and pos is not None:
            k, v = self.kv_cache.update(pos, k, v, end)
        drop = self.attn_dropout_p if self.training else 0.0
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=drop)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop)
        return self.resid_dropout(self.wo(y.transpose(1, 2).reshape(b, s, -1)))


class FeedForward(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        h = cfg.ffn_hidden
        self.w1 = nn.Linear(cfg.dim, h, bias=False)
        self.w3 = nn.Linear(cfg.dim, h, bias=False)
        self.w2 = nn.Linear(h, cfg.dim, bias=False)
        self.ffn_dropout = nn.Dropout(cfg.ffn_dropout_p)

    def forward(self, x):
        return self.w2(self.ffn_dropout(F.silu(self.w1(x)) * self.w3(x)))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.attention = Attention(cfg)
        self.feed_forward = FeedForward(cfg)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, x, rope, pos=None, end=None, mask=None):
        h = x + self.attention(self.attention_norm(x), rope, pos, end, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class LabelEmbedder(nn.Module):
    """Class table with one extra row (index num_classes) for the null class used by CFG."""

    def __init__(self, num_classes: int, dim: int, dropout_prob: float, null_class: bool):
        super().__init__()
        self.num_classes, self.dropout_prob = num_classes, dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(null_class), dim)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        if self.training and self.dropout_prob > 0:
            drop = torch.rand(labels.shape, device=labels.device) < self.dropout_prob
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return self.embedding_table(labels).unsqueeze(1)


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.cls_embedding = LabelEmbedder(cfg.num_classes, cfg.dim, cfg.class_dropout_prob, cfg.has_null_class)
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.tok_dropout = nn.Dropout(cfg.token_dropout_p)
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        # Not a buffer: the released state dicts do not hold it, and it must stay float32 under bf16 casts.
        self._rope = rope_2d_table(cfg) if not self.output.weight.is_meta else None
        self.max_cache_len = 0
        if not self.output.weight.is_meta:
            self.initialize_weights()

    def initialize_weights(self) -> None:
        std = self.config.initializer_range
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=std)
        if self.config.zero_init_head:
            nn.init.zeros_(self.output.weight)

    def rope(self, device) -> torch.Tensor:
        if self._rope is None:
            self._rope = rope_2d_table(self.config)
        if self._rope.device != device:
            self._rope = self._rope.to(device)
        return self._rope

    # -- KV cache -------------------------------------------------------------------------------------------
    def setup_caches(self, batch: int, max_len: int, dtype=None) -> None:
        p = self.output.weight
        for layer in self.layers:
            layer.attention.kv_cache = KVCache(batch, self.config.n_head, max_len, self.config.head_dim,
                                               dtype or p.dtype, p.device)
        self.max_cache_len = max_len

    def clear_caches(self) -> None:
        for layer in self.layers:
            layer.attention.kv_cache = None
        self.max_cache_len = 0

    # -- forward --------------------------------------------------------------------------------------------
    def forward(self, idx: torch.Tensor | None, cond_idx: torch.Tensor | None,
                input_pos: torch.Tensor | None = None, targets: torch.Tensor | None = None):
        """Training / full forward: ``forward(tokens[:, :-1], labels)`` -> logits (B, L, V) for [cls, tok_0..].

        With a KV cache set up, ``input_pos`` selects the positions being written: ``forward(None, labels,
        arange(1))`` prefills the class, ``forward(tok[:, None], None, tensor([t]))`` decodes one step.
        Returns ``(logits_float32, loss_or_None)``.
        """
        parts = []
        if cond_idx is not None:
            parts.append(self.cls_embedding(cond_idx)[:, : self.config.cls_token_num])
        if idx is not None:
            parts.append(self.tok_embeddings(idx))
        if not parts:
            raise ValueError("forward needs idx, cond_idx or both")
        h = self.tok_dropout(torch.cat(parts, dim=1))
        s = h.shape[1]
        rope_all = self.rope(h.device)
        cached = self.layers[0].attention.kv_cache is not None
        if cached:
            if input_pos is None:
                raise ValueError("input_pos is required when the KV cache is set up")
            end = int(input_pos.max()) + 1
            if end > self.max_cache_len:
                raise ValueError(f"position {end - 1} exceeds the KV cache length {self.max_cache_len}")
            mask = torch.arange(end, device=h.device)[None, :] <= input_pos[:, None]
            rope, pos = rope_all[input_pos], input_pos
        else:
            if s > rope_all.shape[0]:
                raise ValueError(f"sequence of {s} positions exceeds block_size + cls ({rope_all.shape[0]})")
            if input_pos is not None and not torch.equal(input_pos.cpu(), torch.arange(s)):
                raise ValueError("without a KV cache the forward covers positions 0..S-1; set up caches first")
            rope, pos, end, mask = rope_all[:s], None, None, None
        for layer in self.layers:
            h = layer(h, rope, pos, end, mask)
        logits = self.output(self.norm(h)).float()
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        return logits, loss

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def fsdp_wrap_modules(self) -> tuple[type[nn.Module], ...]:
        return (TransformerBlock,)


def build_gpt(cfg: GPTConfig | str, **overrides) -> GPT:
    return GPT(gpt_config(cfg, **overrides) if isinstance(cfg, str) else cfg)


__all__ = ["GPT", "GPTConfig", "GPT_CONFIGS", "KVCache", "build_gpt", "gpt_config", "rope_2d_table"]
