"""Two-process sampling (gloo, CPU) writes the same npz as one process, with no rank holding more than its share.

Run as a script (under ``torch.distributed.run`` for 2 ranks) this file is the worker: it samples with
``tracemalloc`` on and writes what each rank held at most from its first ``sample_images`` call on (the peak of
traced memory above the level at that call: model, head and tokenizer are loaded by then, so what remains is the
images and what is done with them). The images are made numpy-owned (a copy of ``to_uint8``'s result), so
tracemalloc sees every image a rank holds, whether in a list, a dict, a pickle from a gather or a stacked array.
"""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
N, BATCH, GRID = 48, 4, 8  # 48 images of 32 x 32 x 3 (VQ-tiny downsamples by 4): 24 per rank, 4 per batch


def _compose(overrides):
    from hydra import compose, initialize_config_dir

    import masc_llamagen.sample  # noqa: F401 - registers the sample schema

    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIGS)):
        return compose("sample", overrides=overrides)


def _overrides(ckpt, out_dir):
    return [f"checkpoint={ckpt}", f"num_samples={N}", f"batch_size={BATCH}", f"out_dir={out_dir}", "cfg_scale=1.5",
            "decoder=frequency", "top_k=8", "png=false", "seed=5"]


def _worker(ckpt: str, out_dir: str, report_path: str) -> None:
    import tracemalloc

    import masc_llamagen.sample as ms

    plain, sample_images, base = ms.to_uint8_numpy, ms.sample_images, []
    ms.to_uint8_numpy = lambda x: np.array(plain(x))  # numpy-owned, so traced

    def traced_sample_images(*args, **kwargs):
        if not base:
            base.append(tracemalloc.get_traced_memory()[0])
            tracemalloc.reset_peak()
        return sample_images(*args, **kwargs)

    ms.sample_images = traced_sample_images
    cfg = _compose(_overrides(ckpt, out_dir))
    buf = io.BytesIO()
    np.savez(buf, x=np.zeros(1))
    np.load(io.BytesIO(buf.getvalue()))["x"]  # numpy imports its npy header parser on first use: not the sampler's
    tracemalloc.start()
    ms.sample(cfg)
    held = tracemalloc.get_traced_memory()[1] - base[0]
    tracemalloc.stop()
    rank = int(os.environ.get("RANK", "0"))
    Path(f"{report_path}{rank}.json").write_text(json.dumps({"held": held, "world": os.environ.get("WORLD_SIZE")}))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from train_utils import compose_cfg, make_assets

    from masc_llamagen.train.loop import train

    root = tmp_path_factory.mktemp("sd")
    assets = make_assets(root, grid=GRID)
    out = train(compose_cfg(root, assets, ["head=random", "head.k=16", "train.steps=2", "train.global_batch_size=8",
                                           "train.ckpt_every=2"], run="run"))
    return root, Path(out["checkpoint"])


@pytest.mark.slow
def test_two_processes_write_the_one_process_npz_and_hold_only_their_share(trained, tmp_path):
    _, ckpt = trained
    one, two = tmp_path / "one", tmp_path / "two"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}  # same kernels in both runs
    runs = [[sys.executable, __file__, str(ckpt), str(one), str(tmp_path / "one-rank")],
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29587",
             __file__, str(ckpt), str(two), str(tmp_path / "two-rank")]]
    for cmd in runs:
        r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
    with np.load(one / "samples.npz") as a, np.load(two / "samples.npz") as b:
        assert sorted(b.files) == ["arr_0", "labels"]
        assert a["arr_0"].shape == b["arr_0"].shape == (N, 4 * GRID, 4 * GRID, 3)  # exactly num_samples
        assert a["arr_0"].dtype == b["arr_0"].dtype == np.uint8 and a["labels"].dtype == b["labels"].dtype
        assert a["arr_0"].tobytes() == b["arr_0"].tobytes()
        assert a["labels"].tobytes() == b["labels"].tobytes()
        assert len({img.tobytes() for img in b["arr_0"]}) > N // 2  # real samples, not one image repeated
    assert sorted(p.name for p in two.iterdir()) == ["samples.npz", "samples.npz.json"]  # shards and temps gone
    assert json.loads((two / "samples.npz.json").read_text())["num_samples"] == N
    image = (4 * GRID) ** 2 * 3
    assert json.loads((tmp_path / "one-rank0.json").read_text())["world"] is None
    for rank in (0, 1):
        rep = json.loads((tmp_path / f"two-rank{rank}.json").read_text())
        assert rep["world"] == "2"
        # Streaming: about one batch of images at a time, below the rank's share (a gather holds all N: 2 shares).
        assert BATCH * image <= rep["held"] < (N // 2) * image, (rank, rep["held"], (N // 2) * image)


def _write_shard(out, rank, world, n, images):
    from masc_llamagen.sample import _NpzWriter, _shard_path, share

    mine = share(n, rank, world)
    with _NpzWriter(_shard_path(out, rank)) as w:
        rows = w.rows("arr_0", (len(mine), *images.shape[1:]) if len(mine) else (0, 0, 0, 3))
        for i in mine:
            rows.write(images[i : i + 1])
        rows.close()
        w.add("meta", np.array([mine.start, mine.stop, n]))


@pytest.mark.parametrize("n, world", [(7, 3), (2, 3)])  # (2, 3): rank 0 has nothing to sample
def test_assembly_streams_the_shards_into_the_savez_layout_in_index_order(tmp_path, n, world):
    import torch

    from masc_llamagen.sample import _assemble

    images = np.random.default_rng(n).integers(0, 256, (n, 5, 4, 3), dtype=np.uint8)
    labels = torch.arange(n) % 3
    for rank in range(world):
        _write_shard(tmp_path, rank, world, n, images)
    assert _assemble(tmp_path, world, n, labels, chunk_rows=2) == (n, 5, 4, 3)
    np.savez(tmp_path / "ref.npz", arr_0=images, labels=labels.numpy())
    with np.load(tmp_path / "samples.npz") as got, np.load(tmp_path / "ref.npz") as ref:
        assert sorted(got.files) == sorted(ref.files)
        for k in ref.files:
            assert got[k].dtype == ref[k].dtype and got[k].shape == ref[k].shape
            assert got[k].tobytes() == ref[k].tobytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref.npz", "samples.npz"]


def test_a_stale_shard_or_a_short_write_publishes_nothing(tmp_path):
    import torch

    from masc_llamagen.sample import _assemble, _NpzWriter

    images = np.zeros((4, 2, 2, 3), dtype=np.uint8)
    _write_shard(tmp_path, 0, 2, 4, images)
    _write_shard(tmp_path, 1, 2, 6, images.repeat(2, 0))  # left by a run with another num_samples
    with pytest.raises(RuntimeError, match="shard-00001.npz holds samples 3..6 of 6, expected 2..4 of 4"):
        _assemble(tmp_path, 2, 4, torch.zeros(4, dtype=torch.long), chunk_rows=2)
    with pytest.raises(RuntimeError, match="wrote 1 of 4 rows"), _NpzWriter(tmp_path / "samples.npz") as w:
        rows = w.rows("arr_0", (4, 2, 2, 3))
        rows.write(images[:1])
        rows.close()  # no filler: a short array is an error, and samples.npz never appears
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-00000.npz", "shard-00001.npz"]


if __name__ == "__main__":
    _worker(*sys.argv[1:4])
