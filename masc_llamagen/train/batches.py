"""Resumable, process-count-independent batching.

Global batch ``s`` is a fixed slice of a per-epoch seeded permutation; process ``r`` of ``w`` takes the r-th of w equal
parts. So the data seen at step s depends only on (seed, s), never on how many processes share it or when the run
was interrupted: resume restarts at the exact batch, and 2 processes x b see what 1 process x 2b sees. Class dropout
for CFG is drawn here per (seed, epoch, image) for the same reason.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler


class StepBatches(Sampler):
    """Yields, for steps start..total-1, this rank's list of (epoch, index) pairs."""

    def __init__(self, n: int, global_batch: int, rank: int, world: int, seed: int, start_step: int, total: int):
        if global_batch % world:
            raise ValueError(f"global_batch_size={global_batch} is not divisible by {world} processes")
        if n < global_batch:
            raise ValueError(f"the dataset has {n} samples, fewer than one global batch of {global_batch}")
        self.n, self.gb, self.rank, self.world, self.seed = n, global_batch, rank, world, seed
        self.start, self.total = start_step, total
        self.steps_per_epoch = n // global_batch  # the ragged tail of each epoch is dropped

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def global_indices(self, step: int) -> np.ndarray:
        epoch, within = divmod(step, self.steps_per_epoch)
        perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return perm[within * self.gb : (within + 1) * self.gb]

    def __iter__(self):
        local = self.gb // self.world
        for step in range(self.start, self.total):
            idx = self.global_indices(step)[self.rank * local : (self.rank + 1) * local]
            epoch = self.epoch_of(step)
            yield [(epoch, int(i)) for i in idx]

    def __len__(self) -> int:
        return max(0, self.total - self.start)


class EpochIndexed(Dataset):
    """Adapts a CodeDataset to (epoch, index) keys and draws class dropout deterministically."""

    def __init__(self, codes, seed: int, class_dropout: float, null_class: int):
        self.codes, self.seed, self.p, self.null = codes, seed, class_dropout, null_class

    def __len__(self) -> int:
        return len(self.codes)

    def __getitem__(self, key):
        epoch, i = key
        self.codes.set_epoch(epoch)
        tokens, label = self.codes[i]
        return tokens, (self.null if _dropped(self.seed, epoch, i, self.p) else int(label))


def _dropped(seed: int, epoch: int, i: int, p: float) -> bool:
    return p > 0 and np.random.default_rng([seed, epoch, i, 7]).random() < p


class EpochIndexedCaptions(Dataset):
    """Text-to-image: (epoch, index) -> (tokens, item, dropped); the caption features are gathered per batch."""

    def __init__(self, codes, seed: int, caption_dropout: float):
        self.codes, self.seed, self.p = codes, seed, caption_dropout

    def __len__(self) -> int:
        return len(self.codes)

    def __getitem__(self, key):
        epoch, i = key
        self.codes.set_epoch(epoch)
        tokens, item = self.codes[i]
        return tokens, int(item), _dropped(self.seed, epoch, i, self.p)


def collate(items):
    """Class-conditional batch: tokens (B, L) and the model's keyword inputs."""
    tokens = torch.stack([torch.as_tensor(t, dtype=torch.long) for t, _ in items])
    labels = torch.tensor([label for _, label in items], dtype=torch.long)
    return tokens, {"cond_idx": labels}


class CaptionCollate:
    """Text-to-image batch: right-aligned caption features (B, slots, C) float16 with their mask, which samples
    get the null caption, and which are valid (an unreadable image or a missing feature row costs no gradient).
    Masks are (B, slots); the (B, S, S) attention mask is built on the device by the model."""

    def __init__(self, store, slots: int, item_valid: np.ndarray | None = None):
        self.store, self.slots, self.item_valid = store, slots, item_valid

    def __call__(self, items):
        tokens = torch.stack([torch.as_tensor(t, dtype=torch.long) for t, _, _ in items])
        idx = np.array([item for _, item, _ in items], dtype=np.int64)
        feats, mask = self.store.batch(idx, slots=self.slots)
        valid = np.array([self.store.valid(int(i)) for i in idx], dtype=bool)
        if self.item_valid is not None:
            valid &= self.item_valid[idx]
        return tokens, {"cond_idx": torch.as_tensor(feats).to(torch.float16),
                        "caption_mask": torch.as_tensor(mask, dtype=torch.bool),
                        "caption_drop": torch.tensor([d for _, _, d in items], dtype=torch.bool),
                        "valid": torch.from_numpy(valid)}
