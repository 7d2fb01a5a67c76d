"""The shared helpers at the bottom: one uint8 mapping, one grid writer, one device rule, one atomic directory."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from masc_llamagen.errors import ConfigError
from masc_llamagen.utils.devices import pick_device
from masc_llamagen.utils.images import from_uint8, save_grid, to_uint8, to_uint8_numpy
from masc_llamagen.utils.io import atomic_directory, atomic_write_json


def test_uint8_round_trip_is_exact_for_every_value():
    u = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, axis=-1)
    x = from_uint8(u)
    assert x.shape == (1, 3, 16, 16) and x.min() == -1 and x.max() == 1
    assert np.array_equal(to_uint8_numpy(x), u)


def test_to_uint8_matches_llamagens_mapping_elementwise():
    x = torch.linspace(-1.3, 1.3, 3 * 7 * 5).reshape(1, 3, 7, 5)
    brute = np.empty((1, 7, 5, 3), dtype=np.uint8)
    for c in range(3):
        for i in range(7):
            for j in range(5):
                v = np.float32(127.5) * np.float32(x[0, c, i, j]) + np.float32(128.0)  # float32, as the tensor op
                brute[0, i, j, c] = int(min(255.0, max(0.0, float(v))))
    assert np.array_equal(to_uint8_numpy(x), brute)
    assert to_uint8(x).dtype == torch.uint8 and to_uint8(x).device == x.device


def test_to_uint8_keeps_the_device():
    x = torch.zeros(2, 3, 4, 4, device="meta")
    assert to_uint8(x).device.type == "meta"


def test_save_grid_tiles_row_major_with_white_padding(tmp_path):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(5, 4, 6, 3), dtype=np.uint8)
    path = save_grid(imgs, tmp_path / "g" / "grid.png", nrow=3)
    grid = np.asarray(Image.open(path))
    assert grid.shape == (8, 18, 3)
    for i in range(5):
        r, c = divmod(i, 3)
        assert np.array_equal(grid[r * 4 : (r + 1) * 4, c * 6 : (c + 1) * 6], imgs[i])
    assert (grid[4:, 12:] == 255).all()  # the missing sixth cell
    same = save_grid(from_uint8(imgs), tmp_path / "f.png", nrow=3)  # float input gives the same PNG
    assert np.array_equal(np.asarray(Image.open(same)), grid)


def test_pick_device_rules():
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="auto, cpu, cuda"):
        pick_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            pick_device("cuda:0")


def test_atomic_directory_appears_whole_or_not_at_all(tmp_path):
    dest = tmp_path / "codes"
    with pytest.raises(RuntimeError):
        with atomic_directory(dest) as tmp:
            (tmp / "a").write_text("1")
            raise RuntimeError("killed mid-write")
    assert not dest.exists() and list(tmp_path.iterdir()) == []
    with atomic_directory(dest) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(FileExistsError):
        with atomic_directory(dest) as tmp:
            (tmp / "b").write_text("2")
    assert sorted(p.name for p in dest.iterdir()) == ["a"]
    with atomic_directory(dest, overwrite=True) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in dest.iterdir()) == ["b"] and sorted(p.name for p in tmp_path.iterdir()) == ["codes"]


def test_atomic_write_json_takes_the_callers_encoder(tmp_path):
    p = atomic_write_json(tmp_path / "x.json", {"v": np.float32(0.5)}, indent=None, default=float)
    assert p.read_text() == '{"v": 0.5}\n'


def test_atomic_files_get_the_umask_mode_not_mkstemps_0600(tmp_path):
    import os
    import stat

    from masc_llamagen.utils.io import atomic_write_text

    old = os.umask(0o027)
    try:
        p = atomic_write_text(tmp_path / "r.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(p.stat().st_mode) == 0o640
