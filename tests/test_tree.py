"""MASC tree: exactness against a brute-force O(N^3) average linkage and scipy, cuts, files, errors, baselines."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.cluster.hierarchy import cut_tree, fcluster, linkage

from masc_llamagen.errors import ConfigError
from masc_llamagen.masc import linkage as L
from masc_llamagen.masc import mappings as M
from masc_llamagen.masc import tree as T
from masc_llamagen.masc import tree_cli as CLI
from masc_llamagen.masc.members import cluster_members, size_summary, validate_mapping

VQ_FIXTURE = "tests/fixtures/llamagen/vq_tiny.safetensors"


def brute_force_average(points: np.ndarray, k: int) -> np.ndarray:
    """The reference loop, naively: full distance matrix, merge the closest pair (Lance-Williams) until k remain."""
    n = len(points)
    D = np.sqrt(((points[:, None, :] - points[None, :, :]) ** 2).sum(-1))
    np.fill_diagonal(D, np.inf)
    size = np.ones(n)
    label = np.arange(n)
    alive = np.ones(n, dtype=bool)
    for _ in range(n - k):
        i, j = np.unravel_index(np.argmin(D), D.shape)
        i, j = min(i, j), max(i, j)
        row = (size[i] * D[i] + size[j] * D[j]) / (size[i] + size[j])
        D[i, :] = row
        D[:, i] = row
        D[i, i] = np.inf
        D[j, :] = np.inf
        D[:, j] = np.inf
        size[i] += size[j]
        alive[j] = False
        label[label == j] = i
    return label


def inertia(points: np.ndarray, mapping: np.ndarray) -> float:
    """Sum of squared distances to cluster means: the k-means objective, to compare mappings."""
    k = int(mapping.max()) + 1
    cent = np.stack([points[mapping == c].mean(0) for c in range(k)])
    return float(((points - cent[mapping]) ** 2).sum())


def codebook(seed: int, n: int, d: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def same_partition(a, b) -> bool:
    return np.array_equal(L.canonical_labels(a), L.canonical_labels(b))


@pytest.fixture(scope="module")
def small_tree():
    return T.build_tree(codebook(7, 120))


# ----------------------------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("seed,n,d", [(0, 300, 8), (1, 250, 8), (2, 200, 3), (3, 150, 16)])
def test_partition_equals_brute_force_and_scipy(seed, n, d):
    cb = codebook(seed, n, d)
    pts = L.prepare_points(cb)
    tree = T.build_tree(cb)
    zs = linkage(pts, "average")
    for k in (1, 2, 3, 7, 20, n // 3, n // 2, n - 1, n):
        ours = tree.mapping(k)
        assert same_partition(ours, brute_force_average(pts, k)), (seed, k)
        assert same_partition(ours, cut_tree(zs, n_clusters=k).ravel()), (seed, k)
        if 1 < k:
            assert same_partition(ours, fcluster(zs, k, "maxclust")), (seed, k)
    # Same merge heights as scipy (both in increasing order; last-ulp differences at most).
    np.testing.assert_allclose(tree.linkage[:, 2], zs[:, 2], rtol=1e-12, atol=0)


@pytest.mark.parametrize("method", L.METHODS)
def test_other_linkages_match_scipy(method):
    cb = codebook(11, 160)
    pts = L.prepare_points(cb)
    ours = L.linkage_matrix(pts, method)
    zs = linkage(pts, method)
    for k in (1, 2, 5, 17, 80, 159, 160):
        assert np.array_equal(L.cut_linkage(ours, k), L.cut_linkage(zs, k)), (method, k)
        assert same_partition(L.cut_linkage(ours, k), cut_tree(zs, n_clusters=k).ravel()), (method, k)


def test_slot_order_is_invisible_except_for_ties():
    # The build's internal order changes nothing but tie-breaking: any order gives the same merge table here.
    pts = L.prepare_points(codebook(5, 257))
    ref = L.linkage_matrix(pts)
    for order in (np.arange(257), np.arange(257)[::-1], np.random.default_rng(0).permutation(257)):
        assert np.array_equal(L._generic_linkage(pts, 0, order), ref)
    big = L.prepare_points(codebook(6, 2500))
    assert np.array_equal(L._generic_linkage(big, 0, np.arange(2500)), L.linkage_matrix(big))  # threaded path


def test_raw_table_option():
    cb = codebook(4, 90) * np.linspace(0.5, 3, 90, dtype=np.float32)[:, None]
    raw = T.build_tree(cb, normalize=False)
    assert not raw.normalized and T.build_tree(cb).normalized
    zs = linkage(cb.astype(np.float64), "average")
    for k in (3, 30):
        assert same_partition(raw.mapping(k), cut_tree(zs, n_clusters=k).ravel())


# ------------------------------------------------------------------------------------------------ cuts


def test_cuts_have_exactly_k_clusters_in_documented_order(small_tree):
    n = small_tree.n
    for k in range(1, n + 1):
        cut = small_tree.cut(k)
        m = cut.mapping
        assert m.dtype == np.int64 and m.shape == (n,)
        assert m.min() == 0 and m.max() == k - 1
        assert cut.sizes.sum() == n and (cut.sizes > 0).all() and cut.sizes.size == k
        firsts = np.array([np.flatnonzero(m == c)[0] for c in range(k)])
        assert (np.diff(firsts) > 0).all() and firsts[0] == 0  # ids ascend with each cluster's first token
    assert np.array_equal(small_tree.mapping(n), np.arange(n))
    assert not small_tree.mapping(1).any()


def test_cut_by_count_with_tied_heights():
    # A regular grid: many exactly equal distances and merge heights.
    g = np.stack(np.meshgrid(np.arange(6), np.arange(6)), -1).reshape(-1, 2).astype(np.float32)
    tree = T.build_tree(g, normalize=False)
    assert np.unique(tree.linkage[:, 2]).size < tree.n - 1
    for k in range(1, tree.n + 1):
        assert np.unique(tree.mapping(k)).size == k
    assert np.array_equal(tree.linkage, T.build_tree(g, normalize=False).linkage)


def test_member_table(small_tree):
    cut = small_tree.cut(17)
    mt = cluster_members(cut.mapping, small_tree.n, 17)
    assert mt.k == 17 and np.array_equal(mt.sizes, cut.sizes) and np.array_equal(mt.mapping, cut.mapping)
    for c in range(17):
        assert np.array_equal(mt[c], np.flatnonzero(cut.mapping == c))
    assert cluster_members(cut.mapping, small_tree.n).k == 17  # k from the ids
    st = size_summary(cut.sizes)
    desc = np.sort(cut.sizes)[::-1]
    assert (st["k"], st["n"], st["min"], st["max"]) == (17, small_tree.n, desc[-1], desc[0])
    assert st["singletons"] == sum(int(s) == 1 for s in cut.sizes)
    assert st["top10_share"] == desc[:10].sum() / small_tree.n


def test_algorithm_and_tree_file_need_no_torch():
    code = ("import sys; import masc_llamagen.masc.mappings, masc_llamagen.masc.tree; heavy = [m for m in sys.modules "
            "if m.split('.')[0] in ('torch', 'hydra') or m == 'masc_llamagen.checkpoint']; assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_duplicate_rows_are_deterministic():
    cb = codebook(9, 40)
    cb[[5, 17, 30]] = cb[3]
    cb[22] = cb[8]
    t1, t2 = T.build_tree(cb), T.build_tree(cb)
    assert np.array_equal(t1.linkage, t2.linkage)
    # Duplicates come first in the tie order, by id: positions 3:0 5:1 8:2 17:3 22:4 30:5. A cluster sits at its
    # last member's position; the smallest (earlier, later) pair at distance 0 merges first:
    # (3, 5) -> node 40 at position 1; (40, 17) = (1, 3) -> 41 at 3; (8, 22) = (2, 4) -> 42; (41, 30) = (3, 5).
    assert t1.linkage[:4, 2].max() == 0.0 and t1.linkage[4, 2] > 0
    assert t1.linkage[:4, :2].tolist() == [[3, 5], [17, 40], [8, 22], [30, 41]]
    m = t1.mapping(36)
    assert m[3] == m[5] == m[17] == m[30] and m[8] == m[22]
    # All-identical rows: still exactly k clusters.
    same = np.ones((10, 8), np.float32)
    assert np.unique(T.build_tree(same).mapping(4)).size == 4


# --------------------------------------------------------------------------------------------- tree files


def test_byte_identical_rebuild_and_roundtrip(tmp_path):
    cb = codebook(3, 64)
    p1 = T.build_tree(cb).save(tmp_path / "a.npz")
    p2 = T.build_tree(cb).save(tmp_path / "b.npz")
    assert p1.read_bytes() == p2.read_bytes()
    with zipfile.ZipFile(p1) as zf:
        assert all(i.date_time == (1980, 1, 1, 0, 0, 0) for i in zf.infolist())
    with np.load(p1, allow_pickle=False) as f:
        meta = json.loads(str(f["meta"][()]))
        assert f["linkage"].shape == (63, 4)
    assert meta["sha256"] == T.codebook_sha256(cb) and meta["n"] == 64 and meta["d"] == 8
    assert meta["normalized"] is True and meta["method"] == "average"
    assert {"numpy", "scipy", "masc_llamagen"} <= set(meta["versions"])
    back = T.load_tree(p1)
    assert np.array_equal(back.linkage, T.build_tree(cb).linkage)
    assert back.fingerprint == T.Fingerprint.of(cb)
    T.verify_fingerprint(back.fingerprint, cb)
    assert not list(tmp_path.glob(".*.tmp"))


def test_single_token_codebook(tmp_path):
    tree = T.build_tree(np.ones((1, 4), np.float32))
    assert tree.linkage.shape == (0, 4) and tree.mapping(1).tolist() == [0]
    assert T.load_tree(tree.save(tmp_path / "one.npz")).n == 1


# ---------------------------------------------------------------------------------------------- bad input


def test_k_out_of_range(small_tree):
    for k in (0, -1, small_tree.n + 1):
        with pytest.raises(L.TreeError, match=rf"1 <= k <= {small_tree.n}"):
            small_tree.cut(k)
    with pytest.raises(L.TreeError, match="integer"):
        small_tree.mapping(2.5)


@pytest.mark.parametrize("bad,match", [
    (np.array([[0.0, np.nan], [1.0, 2.0]]), "non-finite"),
    (np.array([[0.0, np.inf], [1.0, 2.0]]), "non-finite"),
    (np.zeros((0, 8)), "empty"),
    (np.zeros(8), "1-D"),
    (np.zeros((4, 0)), "0 columns"),
    (np.zeros((2, 3, 4)), "3-D"),
])
def test_bad_codebooks(bad, match):
    with pytest.raises(L.TreeError, match=match) as e:
        T.build_tree(bad)
    assert "\n" not in str(e.value)


def test_fingerprint_mismatch_names_both_sides(small_tree):
    other = codebook(8, 100)
    with pytest.raises(L.TreeError) as e:
        T.verify_fingerprint(small_tree.fingerprint, other)
    msg = str(e.value)
    assert small_tree.fingerprint.sha256[:12] in msg and T.codebook_sha256(other)[:12] in msg
    assert "N=120 d=8" in msg and "N=100 d=8" in msg and "\n" not in msg
    changed = codebook(7, 120)
    changed[0, 0] += 1e-3  # same shape, different values
    with pytest.raises(L.TreeError, match="mismatch"):
        T.verify_fingerprint(small_tree.fingerprint, changed)


def test_mapping_length_and_ids():
    with pytest.raises(L.TreeError, match="N=10 tokens"):
        validate_mapping(np.zeros(9, np.int64), 10)
    with pytest.raises(L.TreeError, match=r"ids in \[0, 3\]"):
        validate_mapping(np.array([0, 1, 5, 2]), 4, k=4)
    with pytest.raises(L.TreeError, match="empty"):
        validate_mapping(np.array([0, 0, 2, 2]), 4, k=3)


def test_missing_and_corrupt_tree_files(tmp_path, small_tree):
    with pytest.raises(L.TreeError, match="not found"):
        T.load_tree(tmp_path / "nope.npz")
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip at all")
    with pytest.raises(L.TreeError, match="corrupt"):
        T.load_tree(junk)
    good = small_tree.save(tmp_path / "good.npz")
    cut = tmp_path / "cut.npz"
    cut.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    with pytest.raises(L.TreeError, match="corrupt"):
        T.load_tree(cut)
    other = tmp_path / "other.npz"
    np.savez(other, x=np.zeros(3))
    with pytest.raises(L.TreeError, match="not a MASC tree"):
        T.load_tree(other)
    z = small_tree.linkage.copy()
    z[5, 0] = z[6, 0]  # a node merged twice
    bad = T.write_npz(tmp_path / "bad.npz", {"linkage": z, "meta": np.load(good)["meta"]})
    with pytest.raises(L.TreeError, match="not a valid dendrogram"):
        T.load_tree(bad)


# ------------------------------------------------------------------------------------------- codebook files


def test_codebook_sources(tmp_path):
    cb = codebook(1, 30, 4)
    np.save(tmp_path / "cb.npy", cb)
    torch.save(torch.from_numpy(cb), tmp_path / "bare.pt")
    torch.save({"model": {"quantize.embedding.weight": torch.from_numpy(cb), "x.bias": torch.zeros(3)}},
               tmp_path / "vq.pt")
    torch.save({"only": torch.from_numpy(cb)}, tmp_path / "one.pt")
    from safetensors.torch import save_file

    save_file({"emb": torch.from_numpy(cb)}, str(tmp_path / "cb.safetensors"))
    for name in ("cb.npy", "bare.pt", "vq.pt", "one.pt", "cb.safetensors"):
        assert np.array_equal(CLI.load_codebook(tmp_path / name), cb), name
    torch.save({"a": torch.zeros(3, 2), "b": torch.zeros(4, 2)}, tmp_path / "two.pt")
    with pytest.raises(L.TreeError, match="2-D tensors"):
        CLI.load_codebook(tmp_path / "two.pt")
    with pytest.raises(L.TreeError, match="not found"):
        CLI.load_codebook(tmp_path / "missing.npy")
    vq = CLI.load_codebook(VQ_FIXTURE)
    assert vq.shape == (64, 8) and vq.dtype == np.float32


def test_one_codebook_reader_for_checkpoints_models_and_tree_files(tmp_path):
    import hashlib

    from safetensors.numpy import load_file

    from masc_llamagen.tokenizer import build_vq
    from masc_llamagen.weights import (
        CODEBOOK_KEY,
        CheckpointError,
        read_codebook,
        save_weights,
        tokenizer_fingerprint,
        vq_codebook,
    )

    stored = load_file(VQ_FIXTURE)[CODEBOOK_KEY].astype(np.float32)  # float16 in the file, read without our code
    assert np.array_equal(read_codebook(VQ_FIXTURE), stored) and read_codebook(VQ_FIXTURE).dtype == np.float32
    assert np.array_equal(CLI.load_codebook(VQ_FIXTURE), stored)
    torch.manual_seed(0)
    vq = build_vq("VQ-tiny")
    save_weights(tmp_path / "vq.safetensors", vq, vq.config.to_dict(), "vq")
    cb = vq_codebook(vq)
    weight = vq.quantize.embedding.weight.detach().numpy().copy()
    assert cb.dtype == np.float32 and np.array_equal(cb, weight)
    assert np.array_equal(read_codebook(tmp_path / "vq.safetensors"), cb)
    assert tokenizer_fingerprint(vq) == hashlib.sha256(weight.tobytes()).hexdigest() == T.codebook_sha256(cb)
    with torch.no_grad():
        vq.quantize.embedding.weight.add_(1.0)
    assert np.array_equal(cb, weight)  # a copy: later training does not move a recorded codebook
    torch.save({"w": torch.zeros(3, 2)}, tmp_path / "gpt.pt")
    with pytest.raises(CheckpointError, match=f"has no {CODEBOOK_KEY}; is it a VQ tokenizer") as e:
        read_codebook(tmp_path / "gpt.pt")
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------- baselines


def test_kmeans_baseline():
    cb = codebook(2, 200)
    pts = L.prepare_points(cb)
    km = M.build_mapping("kmeans", cb, 12, seed=0)
    rnd = M.build_mapping("random", cb, 12, seed=0)
    assert np.unique(km).size == 12 and np.array_equal(km, L.canonical_labels(km))
    assert inertia(pts, km) < inertia(pts, rnd)
    assert np.array_equal(km, M.build_mapping("kmeans", cb, 12, seed=0))


def test_balanced_kmeans_sizes():
    cb = codebook(6, 256)
    pts = L.prepare_points(cb)
    bal = M.build_mapping("balanced_kmeans", cb, 16, seed=1)
    assert (np.bincount(bal) == 16).all()
    assert inertia(pts, bal) < inertia(pts, M.build_mapping("random", cb, 16, seed=1))
    uneven = M.build_mapping("balanced_kmeans", cb, 10, seed=1)
    sizes = np.bincount(uneven)
    assert sizes.size == 10 and sizes.max() - sizes.min() <= 1 and sizes.sum() == 256
    # Too few candidates per point: the leftover path still fills every cluster exactly.
    a = M._balanced_assign(pts, pts[:16], np.full(16, 16), n_cand=2)
    assert (np.bincount(a, minlength=16) == 16).all()


def test_random_and_linkage_mappings():
    cb = codebook(3, 100)
    r = M.build_mapping("random", cb, 7, seed=3)
    assert np.unique(r).size == 7 and np.array_equal(r, M.build_mapping("random", cb, 7, seed=3))
    assert not np.array_equal(r, M.build_mapping("random", cb, 7, seed=4))
    assert np.array_equal(M.build_mapping("masc", cb, 9), T.build_tree(cb).mapping(9))
    for method in ("single", "complete", "ward"):
        assert np.unique(M.build_mapping(method, cb, 9)).size == 9
    with pytest.raises(L.TreeError, match="unknown mapping method"):
        M.build_mapping("spectral", cb, 3)
    with pytest.raises(L.TreeError, match="out of range"):
        M.build_mapping("kmeans", cb, 101)


# --------------------------------------------------------------------------------------------------- CLI


def test_tree_job_build_cut_stats(tmp_path, capsys):
    cb = codebook(12, 80)
    np.save(tmp_path / "cb.npy", cb)
    tree = str(tmp_path / "tree.npz")
    CLI.run(CLI.TreeJob(action="build", codebook=str(tmp_path / "cb.npy"), tree=tree))
    out = CLI.run(CLI.TreeJob(action="cut", tree=tree, k=10, mapping=str(tmp_path / "m.npy"),
                              codebook=str(tmp_path / "cb.npy")))
    m = np.load(out)
    assert m.dtype == np.int64 and np.array_equal(m, T.build_tree(cb).mapping(10))
    CLI.run(CLI.TreeJob(action="stats", tree=tree, k=10, png=str(tmp_path / "s.png")))
    printed = capsys.readouterr().out
    assert "median" in printed and "singletons" in printed and "top-10" in printed
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The VQ checkpoint itself, raw table.
    CLI.run(CLI.TreeJob(action="build", codebook=VQ_FIXTURE, tree=str(tmp_path / "vq.npz"), normalize=False))
    assert not T.load_tree(tmp_path / "vq.npz").normalized
    with pytest.raises(L.TreeError, match="1 <= k <= 80"):
        CLI.run(CLI.TreeJob(action="cut", tree=tree, k=0, mapping=str(tmp_path / "x.npy")))
    with pytest.raises(L.TreeError, match="mismatch"):
        CLI.run(CLI.TreeJob(action="cut", tree=tree, k=5, mapping=str(tmp_path / "x.npy"), codebook=VQ_FIXTURE))
    with pytest.raises(L.TreeError, match="not found"):
        CLI.run(CLI.TreeJob(action="stats", tree=str(tmp_path / "missing.npz"), k=3))
    assert not (tmp_path / "x.npy").exists()


@pytest.mark.parametrize("job,match", [
    (CLI.TreeJob(action="grow", tree="t.npz"), "action=grow is unknown"),
    (CLI.TreeJob(action="build", tree="t.npz"), "needs codebook="),
    (CLI.TreeJob(action="cut", tree="t.npz", k=3), "needs mapping="),
    (CLI.TreeJob(action="stats", tree="t.npz", k=3, mapping="m.npy"), "does not read mapping"),
])
def test_tree_job_refuses_incomplete_or_ignored_fields(job, match):
    with pytest.raises(ConfigError, match=match):
        CLI.check_job(job)


def test_tree_cli_is_a_hydra_app_that_writes_only_its_files(tmp_path):
    """The real command line: typed overrides, one-line errors with exit code 1, no Hydra output folders."""
    np.save(tmp_path / "cb.npy", codebook(13, 40))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "masc_llamagen.tree", *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=120)

    r = cli("action=build", "codebook=cb.npy", "tree=t.npz")
    assert r.returncode == 0 and "built" in r.stdout, r.stderr
    assert np.array_equal(T.load_tree(tmp_path / "t.npz").linkage, T.build_tree(codebook(13, 40)).linkage)
    r = cli("action=cut", "tree=cb.npy", "k=4", "mapping=m.npy")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and r.stderr.startswith("error: ")
    assert "not a MASC tree file" in r.stderr and "action=build" in r.stderr and "Traceback" not in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cb.npy", "t.npz"]
