"""LlamaGen's GPT, class-conditional (``c2i``) or caption-conditional (``t2i``), weight-compatible with the
released checkpoints.

The state-dict keys, shapes and parameter counts equal upstream's for every released config (tested against
``tests/fixtures/llamagen/shapes.json`` and ``tests/fixtures/llamagen_t2i/t2i_shapes.json``). The vocabulary size
is a plain parameter: MASC swaps the N-way token table and head for k-way ones and nothing else changes. The model
knows nothing of heads, Hydra or W&B.

Details the released weights depend on, reproduced exactly:
  * 2-D RoPE where the ``cls_token_num`` condition positions get all-zero rotation rows (not the identity): their
    q and k vanish, so the condition reaches the image tokens only through the attention values;
  * RMSNorm computed in float32, logits returned in float32;
  * t2i: ``cls_token_num`` (120 upstream) caption slots, captions right-aligned (left-padded with zero rows); the
    caption MLP ``cls_embedding.cap_proj.fc1/fc2`` (no biases, tanh-GELU) and the null caption
    ``cls_embedding.uncond_embedding``, a persistent buffer loaded from the checkpoint and never trained. Padded
    caption slots are masked as keys for every query, with the diagonal kept so no row is empty.

The sequence is ``[cond_0 .. cond_{T-1}, tok_0 .. tok_{L-2}]`` (T = ``cls_token_num``); the training forward
returns the logits at positions T-1 .. T+L-2, the ones that predict ``tok_0 .. tok_{L-1}``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp
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
    drop_path_rate: float = 0.0  # stochastic depth of the last block; block i gets rate * i / (n_layer - 1)
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
    # t2i: width of the caption features (flan-t5-xl: 2048). The slot count is cls_token_num: 120 upstream, the
    # default that gpt_config and from_dict give a t2i config (the dataclass default 1 is the c2i class slot).
    caption_dim: int = 2048

    def __post_init__(self) -> None:
        if self.model_type not in ("c2i", "t2i"):
            raise ValueError(f"model_type={self.model_type!r} is not supported; use 'c2i' (class-conditional) or "
                             "'t2i' (caption-conditional)")
        if self.dim % self.n_head:
            raise ValueError(f"dim={self.dim} is not divisible by n_head={self.n_head}; pick compatible sizes")
        if (self.dim // self.n_head) % 4:
            raise ValueError(f"head dim {self.dim // self.n_head} must be a multiple of 4 for 2-D RoPE")
        side = math.isqrt(self.block_size)
        if side * side != self.block_size:
            raise ValueError(f"block_size={self.block_size} must be a square (grid side^2), e.g. 256 for 16x16")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate={self.drop_path_rate} must be in [0, 1)")
        if self.vocab_size < 1 or self.num_classes < 1:
            raise ValueError(f"vocab_size ({self.vocab_size}) and num_classes ({self.num_classes}) must be >= 1")
        if self.model_type == "t2i" and self.null_class is False:
            raise ValueError("t2i models always carry the null caption (cls_embedding.uncond_embedding): "
                             "leave null_class unset")
        if self.null_class is False and self.class_dropout_prob > 0:
            raise ValueError("class dropout swaps in the null class: null_class=False needs class_dropout_prob=0")
        if self.model_type == "c2i" and self.cls_token_num != 1:
            raise ValueError("cls_token_num must be 1 for class-conditional models")
        if self.model_type == "t2i":
            if self.cls_token_num < 1 or self.caption_dim < 1:
                raise ValueError(f"t2i needs cls_token_num ({self.cls_token_num}, caption slots; 120 upstream) and "
                                 f"caption_dim ({self.caption_dim}, caption width; 2048 for flan-t5-xl) >= 1")

    @property
    def has_null_class(self) -> bool:
        if self.model_type == "t2i":
            return True
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
        """From JSON / a checkpoint / registry + overrides; a t2i dict without ``cls_token_num`` gets upstream's 120."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown GPT config keys {unknown}; valid keys are {sorted(known)}")
        if d.get("model_type") == "t2i" and "cls_token_num" not in d:
            d = {**d, "cls_token_num": T2I_CAPTION_SLOTS}
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


# Upstream's caption slots (flan-t5-xl features, at most 120 tokens): the default cls_token_num of a t2i config.
T2I_CAPTION_SLOTS = 120


def gpt_config(name: str, **overrides) -> GPTConfig:
    """A registry config with overrides (vocab_size, block_size, num_classes, dropouts ...).

    ``model_type="t2i"`` defaults ``cls_token_num`` to upstream's 120 caption slots unless it is given."""
    if name not in GPT_CONFIGS:
        raise ValueError(f"unknown GPT config {name!r}; choose one of {sorted(GPT_CONFIGS)}")
    if overrides.get("model_type") == "t2i":
        overrides.setdefault("cls_token_num", T2I_CAPTION_SLOTS)
    return GPTConfig(**{**GPT_CONFIGS[name], **overrides})


class RMSNorm(nn.Module):
    """Hand-written, not ``torch.nn.RMSNorm``: upstream rounds to the input dtype before the weight multiply."""

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


def right_align_captions(captions: list[torch.Tensor], slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Place captions (each (L_b, C), 1 <= L_b <= slots) in ``slots`` rows, right-aligned: padding rows are zero.

    Returns ``(features (B, slots, C), mask (B, slots) bool, True on caption slots)``, the layout the t2i model
    and upstream's released weights expect."""
    if not captions:
        raise ValueError("right_align_captions needs at least one caption")
    width = captions[0].shape[-1]
    feats = captions[0].new_zeros(len(captions), slots, width)
    mask = torch.zeros(len(captions), slots, dtype=torch.bool, device=feats.device)
    for b, cap in enumerate(captions):
        if cap.dim() != 2 or cap.shape[-1] != width or not 0 < cap.shape[0] <= slots:
            raise ValueError(f"caption {b} has shape {tuple(cap.shape)}; need (L, {width}) with 1 <= L <= {slots}")
        feats[b, slots - cap.shape[0]:] = cap
        mask[b, slots - cap.shape[0]:] = True
    return feats, mask


def attention_mask(key_ok: torch.Tensor, q_pos: torch.Tensor, end: int) -> torch.Tensor:
    """(B, 1, Q, end) bool: query at position ``q_pos[i]`` sees key ``j`` iff ``j <= q_pos[i]`` and (``key_ok[b, j]``
    or ``j == q_pos[i]``). The diagonal is kept so a padded caption slot, whose every key is masked, still attends
    to itself (a row with no key gives NaN on the math SDPA path and would poison the later layers)."""
    k = torch.arange(end, device=q_pos.device)
    causal = k[None, :] <= q_pos[:, None]
    diag = k[None, :] == q_pos[:, None]
    return (causal[None] & (key_ok[:, None, :end] | diag[None]))[:, None]


def caption_attention_mask(caption_mask: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The training mask of a caption-conditional sequence of ``seq_len`` positions whose first ``T`` are the caption
    slots of ``caption_mask`` (B, T): causal, padded caption keys masked for every query, the diagonal kept."""
    return attention_mask(_key_ok(caption_mask, seq_len), torch.arange(seq_len, device=caption_mask.device), seq_len)


def _key_ok(caption_mask: torch.Tensor, length: int) -> torch.Tensor:
    """(B, length) bool: the caption mask on the first T key positions, True on every image position after."""
    b, t = caption_mask.shape
    cap = caption_mask.to(torch.bool)
    if length <= t:
        return cap[:, :length]
    return torch.cat([cap, torch.ones(b, length - t, dtype=torch.bool, device=cap.device)], dim=1)


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
    """SwiGLU under upstream's key names (``w1``/``w2``/``w3``; timm's ``SwiGLU`` names them otherwise)."""

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
    def __init__(self, cfg: GPTConfig, drop_path: float = 0.0):
        super().__init__()
        self.attention = Attention(cfg)
        self.feed_forward = FeedForward(cfg)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()  # no parameters: keys unchanged

    def forward(self, x, rope, pos=None, end=None, mask=None):
        h = x + self.drop_path(self.attention(self.attention_norm(x), rope, pos, end, mask))
        return h + self.drop_path(self.feed_forward(self.ffn_norm(h)))


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


class CaptionEmbedder(nn.Module):
    """Caption features (B, slots, C) -> (B, slots, dim), with the null caption used by caption dropout and CFG.

    ``uncond_embedding`` (slots, C) is a persistent buffer: saved in and loaded (strictly) from the state dict, never
    a parameter, so no optimizer sees it. In training each sample's whole caption (padding rows included) is
    replaced by it with probability ``dropout_prob``; its caption mask is left as it was (as upstream)."""

    def __init__(self, caption_dim: int, dim: int, slots: int, dropout_prob: float):
        super().__init__()
        self.slots, self.caption_dim, self.dropout_prob = slots, caption_dim, dropout_prob
        self.register_buffer("uncond_embedding", torch.randn(slots, caption_dim) / caption_dim**0.5, persistent=True)
        # upstream's cap_proj: fc2(gelu_tanh(fc1(x))) without biases, the keys timm's Mlp gives
        self.cap_proj = Mlp(caption_dim, dim, dim, act_layer=functools.partial(nn.GELU, approximate="tanh"),
                            bias=False)

    def forward(self, caption: torch.Tensor, force_drop: torch.Tensor | None = None) -> torch.Tensor:
        if caption.dim() != 3 or tuple(caption.shape[1:]) != (self.slots, self.caption_dim):
            raise ValueError(f"caption features have shape {tuple(caption.shape)}; need (B, {self.slots}, "
                             f"{self.caption_dim}): right-aligned in cls_token_num slots, caption_dim wide")
        caption = caption.to(self.cap_proj.fc1.weight.dtype)
        drop = force_drop
        if drop is None and self.training and self.dropout_prob > 0:
            drop = torch.rand(caption.shape[0], device=caption.device) < self.dropout_prob
        if drop is not None:
            null = self.uncond_embedding.to(caption.dtype)
            caption = torch.where(drop.to(caption.device, torch.bool)[:, None, None], null, caption)
        return self.cap_proj(caption)


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        if cfg.model_type == "t2i":
            self.cls_embedding = CaptionEmbedder(cfg.caption_dim, cfg.dim, cfg.cls_token_num, cfg.class_dropout_prob)
        else:
            self.cls_embedding = LabelEmbedder(cfg.num_classes, cfg.dim, cfg.class_dropout_prob, cfg.has_null_class)
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.tok_dropout = nn.Dropout(cfg.token_dropout_p)
        n = cfg.n_layer  # deeper blocks drop more (as upstream); plain floats, so a meta-device build works too
        rates = [cfg.drop_path_rate * i / max(1, n - 1) for i in range(n)]
        self.layers = nn.ModuleList(TransformerBlock(cfg, r) for r in rates)
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        # Not a buffer: the released state dicts do not hold it, and it must stay float32 under bf16 casts.
        self._rope = rope_2d_table(cfg) if not self.output.weight.is_meta else None
        self.max_cache_len = 0
        self._cache_keys: torch.Tensor | None = None  # t2i: (B, T) caption mask of the cached sequences
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
        self._cache_keys = None

    def clear_caches(self) -> None:
        for layer in self.layers:
            layer.attention.kv_cache = None
        self.max_cache_len = 0
        self._cache_keys = None

    # -- forward --------------------------------------------------------------------------------------------
    def forward(self, idx: torch.Tensor | None, cond_idx: torch.Tensor | None,
                input_pos: torch.Tensor | None = None, targets: torch.Tensor | None = None,
                caption_mask: torch.Tensor | None = None, valid: torch.Tensor | None = None,
                caption_drop: torch.Tensor | None = None):
        """Training / full forward: ``forward(tokens[:, :-1], cond, targets=tokens)`` -> ``(logits, loss)``.

        ``cond``: class ids (B,) for c2i; for t2i caption features (B, T, caption_dim), right-aligned in the
        T = ``cls_token_num`` slots, with ``caption_mask`` (B, T), 1 on caption slots (None: every slot is caption).
        The attention mask is built here, on the model's device. Logits (float32) are returned for the positions
        that predict image tokens: (B, L, V) for L - 1 input tokens (positions T-1 .. T+L-2).

        ``valid`` (B,) bool/0-1: samples with 0 (missing or corrupt data) contribute exactly zero gradient and do
        not count in the mean: loss = sum of the valid samples' token losses / their token count (a zero loss,
        still on the graph, if none is valid). Their inputs are replaced by zeros first, so NaN features or
        out-of-range ids in them cannot reach the rest of the batch.

        ``caption_drop`` (B,) bool (t2i): these samples get the null caption (CFG training). The training loop draws
        it in the data pipeline, per (seed, epoch, item), so a resumed run drops the same captions.

        With a KV cache set up, ``input_pos`` selects the (ascending, contiguous) positions being written:
        ``forward(None, cond, arange(T), caption_mask=m)`` prefills the condition (t2i: the caption mask is kept
        for the decode steps), ``forward(tok[:, None], None, tensor([t]))`` decodes one step.
        """
        cfg = self.config
        t2i = cfg.model_type == "t2i"
        n_cond = cfg.cls_token_num
        if caption_mask is not None and not t2i:
            raise ValueError("caption_mask is for caption-conditional models (model_type='t2i')")
        if valid is not None:
            idx, cond_idx, targets = self._sanitize(valid, idx, cond_idx, targets)
            valid = valid.to(device=(idx if idx is not None else cond_idx).device).reshape(-1).to(torch.bool)
        parts = []
        if cond_idx is not None:
            parts.append(self.cls_embedding(cond_idx, force_drop=caption_drop) if t2i
                         else self.cls_embedding(cond_idx)[:, :n_cond])
        if idx is not None:
            parts.append(self.tok_embeddings(idx))
        if not parts:
            raise ValueError("forward needs idx, cond_idx or both")
        h = self.tok_dropout(torch.cat(parts, dim=1))
        b, s = h.shape[:2]
        key_ok = None
        if caption_mask is not None:
            if tuple(caption_mask.shape) != (b, n_cond):
                raise ValueError(f"caption_mask has shape {tuple(caption_mask.shape)}; need ({b}, {n_cond})")
            key_ok = caption_mask.to(device=h.device, dtype=torch.bool)
        rope_all = self.rope(h.device)
        cached = self.layers[0].attention.kv_cache is not None
        skip = 0  # leading positions whose outputs predict no image token (the first T-1 caption slots)
        if cached:
            if input_pos is None:
                raise ValueError("input_pos is required when the KV cache is set up")
            end = int(input_pos.max()) + 1
            if end > self.max_cache_len:
                raise ValueError(f"position {end - 1} exceeds the KV cache length {self.max_cache_len}")
            if t2i:
                if key_ok is not None:
                    self._cache_keys = key_ok
                elif self._cache_keys is not None:
                    key_ok = self._cache_keys[:b]
            if key_ok is not None:
                mask = attention_mask(_key_ok(key_ok, end), input_pos, end)
            else:
                mask = torch.arange(end, device=h.device)[None, :] <= input_pos[:, None]
            rope, pos = rope_all[input_pos], input_pos
            if n_cond > 1:
                skip = max(0, n_cond - 1 - int(input_pos.min()))
        else:
            if s > rope_all.shape[0]:
                raise ValueError(f"sequence of {s} positions exceeds block_size + cls ({rope_all.shape[0]})")
            if input_pos is not None and not torch.equal(input_pos.cpu(), torch.arange(s)):
                raise ValueError("without a KV cache the forward covers positions 0..S-1; set up caches first")
            if t2i and cond_idx is None:
                raise ValueError("without a KV cache a t2i forward needs the caption features (cond_idx)")
            rope, pos, end = rope_all[:s], None, None
            mask = None if key_ok is None else attention_mask(_key_ok(key_ok, s), torch.arange(s, device=h.device), s)
            skip = n_cond - 1
        for layer in self.layers:
            h = layer(h, rope, pos, end, mask)
        if skip:
            h = h[:, skip:]
        logits = self.output(self.norm(h)).float()
        loss = None
        if targets is not None:
            if valid is None:
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
            else:
                per_token = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                            reduction="none").view(b, -1)
                keep = valid[:, None].expand_as(per_token)
                loss = torch.where(keep, per_token, torch.zeros_like(per_token)).sum() / keep.sum().clamp_min(1)
        return logits, loss

    def _sanitize(self, valid, idx, cond_idx, targets):
        """Zero the inputs of invalid samples (with ``where``, so NaN/inf and bad ids are dropped, not multiplied)."""
        ref = idx if idx is not None else cond_idx
        if ref is None:
            raise ValueError("forward needs idx, cond_idx or both")
        v = valid.to(device=ref.device).reshape(-1).to(torch.bool)
        if v.shape[0] != ref.shape[0]:
            raise ValueError(f"valid has {v.shape[0]} entries for a batch of {ref.shape[0]}; pass one flag per sample")

        def clean(x):
            if x is None:
                return None
            return torch.where(v.view(-1, *[1] * (x.dim() - 1)), x, torch.zeros_like(x))

        return clean(idx), clean(cond_idx), clean(targets)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def build_gpt(cfg: GPTConfig | str, **overrides) -> GPT:
    return GPT(gpt_config(cfg, **overrides) if isinstance(cfg, str) else cfg)


__all__ = ["GPT", "GPTConfig", "GPT_CONFIGS", "T2I_CAPTION_SLOTS", "CaptionEmbedder", "KVCache", "attention_mask",
           "build_gpt", "caption_attention_mask", "gpt_config", "right_align_captions", "rope_2d_table"]
