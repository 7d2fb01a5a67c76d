"""Golden-fixture parity: prove our GPT and VQ reproduce upstream LlamaGen's outputs.

    python -m masc_llamagen.parity FIXTURE_DIR [--tol 1e-5]

FIXTURE_DIR holds any of ``gpt_tiny.{json,safetensors}``, ``vq_tiny.{json,safetensors}``, ``shapes.json`` (format:
``tests/fixtures/llamagen/README.md``), ``gpt_t2i_tiny.{json,safetensors}`` and ``t2i_shapes.json`` (format:
``tests/fixtures/llamagen_t2i/README.md``); every one present is checked. Everything (config, grid, vocabulary,
caption width and slots, cfg scales, batch) is read from the files; the model sizes of the shapes files are the
registry's, with vocabulary, classes, codebook and caption sizes read from the shapes themselves. Exits 1 on any
mismatch, 2 when the directory holds none of these files (or half of a json+safetensors pair).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from masc_llamagen.weights import CheckpointError, load_gpt, load_vq, read_state_dict

NULL_CAPTION_KEY = "cls_embedding.uncond_embedding"


@dataclass
class Check:
    name: str
    value: float
    limit: float
    unit: str

    @property
    def ok(self) -> bool:
        return self.value <= self.limit

    def line(self) -> str:
        return f"{'ok  ' if self.ok else 'FAIL'}  {self.name:<38} {self.value:.3g} {self.unit} (limit {self.limit:g})"


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """Max absolute error relative to the reference's largest magnitude."""
    return float((a.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30))


def _json(path: Path) -> dict:
    with open(path) as f:
        return json.load(f)


def check_gpt(fixture_dir: Path, tol: float) -> list[Check]:
    from masc_llamagen.models.gpt import GPTConfig
    from masc_llamagen.models.sampling import SamplingConfig, generate

    ref = _json(fixture_dir / "gpt_tiny.json")
    cfg = GPTConfig.from_dict(ref["config"])
    model = load_gpt(fixture_dir / "gpt_tiny.safetensors", cfg).float().eval()
    idx = torch.tensor(ref["input_tokens"], dtype=torch.long)
    labels = torch.tensor(ref["class_labels"], dtype=torch.long)
    with torch.no_grad():
        logits, _ = model(idx, labels)
    checks = [Check("gpt eval logits (max rel err)", rel_err(logits, torch.tensor(ref["eval_forward"]["logits"])),
                    tol, "rel")]
    for scale, tokens in sorted(ref["greedy_generation"]["tokens"].items(), key=lambda kv: float(kv[0])):
        expected = torch.tensor(tokens, dtype=torch.long)
        out = generate(model, labels, expected.shape[1], SamplingConfig(cfg_scale=float(scale), greedy=True))
        checks.append(Check(f"gpt greedy cfg={scale} (mismatches)", float((out != expected).sum()), 0, "tokens"))
    return checks


def _rel_err_or_inf(a: torch.Tensor, ref: torch.Tensor) -> float:
    return rel_err(a, ref) if a.shape == ref.shape else float("inf")


def check_gpt_t2i(fixture_dir: Path, tol: float) -> list[Check]:
    """t2i GPT: eval logits, greedy generations per cfg scale, strict refusal of a missing null caption."""
    from masc_llamagen.models.gpt import GPTConfig
    from masc_llamagen.models.sampling import SamplingConfig, generate

    ref = _json(fixture_dir / "gpt_t2i_tiny.json")
    cfg = GPTConfig.from_dict(ref["config"])
    if cfg.model_type != "t2i":
        raise ValueError(f"gpt_t2i_tiny.json config has model_type={cfg.model_type!r}; expected 't2i'")
    weights = fixture_dir / "gpt_t2i_tiny.safetensors"
    model = load_gpt(weights, cfg).float().eval()
    idx = torch.tensor(ref["input_tokens"], dtype=torch.long)
    captions = torch.tensor(ref["caption_features"], dtype=torch.float32)
    mask = torch.tensor(ref["emb_mask"])
    with torch.no_grad():
        logits, _ = model(idx, captions, caption_mask=mask)
    checks = [Check("t2i eval logits (max rel err)",
                    _rel_err_or_inf(logits, torch.tensor(ref["eval_forward"]["logits"])), tol, "rel")]
    for scale, tokens in sorted(ref["greedy_generation"]["tokens"].items(), key=lambda kv: float(kv[0])):
        expected = torch.tensor(tokens, dtype=torch.long)
        out = generate(model, captions, expected.shape[1], SamplingConfig(cfg_scale=float(scale), greedy=True),
                       caption_mask=mask)
        checks.append(Check(f"t2i greedy cfg={scale} (mismatches)", float((out != expected).sum()), 0, "tokens"))
    checks.append(Check("t2i strict load w/o null caption", float(not _refuses_missing_null(weights, cfg)), 0,
                        "accepted"))
    return checks


def _refuses_missing_null(weights: Path, cfg) -> bool:
    """The loader must refuse the fixture's state dict once ``uncond_embedding`` is removed, naming the key."""
    from safetensors.torch import save_file

    sd, _ = read_state_dict(weights)
    sd = {k: v.contiguous() for k, v in sd.items() if k != NULL_CAPTION_KEY}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "without_null_caption.safetensors"
        save_file(sd, str(path))
        try:
            load_gpt(path, cfg)
        except CheckpointError as e:
            return NULL_CAPTION_KEY in str(e)
    return False


def _shape_differences(model: torch.nn.Module, ref: dict) -> int:
    """Keys missing or extra, shapes that differ, a wrong parameter count, a wrong set of state-dict buffers."""
    own = {k: list(v.shape) for k, v in model.state_dict().items()}
    want = {k: list(v) for k, v in ref["state_dict"].items()}
    n = len(set(own) ^ set(want)) + sum(own[k] != want[k] for k in set(own) & set(want))
    params = dict(model.named_parameters())
    if "params" in ref:
        n += sum(p.numel() for p in params.values()) != int(ref["params"])
    if "buffers_in_state_dict" in ref:
        n += sorted(k for k in own if k not in params) != sorted(ref["buffers_in_state_dict"])
    return n


def _dims(sd: dict, key: str) -> list[int]:
    if key not in sd:
        raise KeyError(key)
    return list(sd[key])


def _meta_gpt(name: str, sd: dict, model_type: str):
    from masc_llamagen.models.gpt import GPT, gpt_config

    extra: dict = {"vocab_size": _dims(sd, "output.weight")[0], "model_type": model_type}
    if model_type == "t2i":
        slots, width = _dims(sd, NULL_CAPTION_KEY)
        extra.update(cls_token_num=slots, caption_dim=width)
    else:  # the shapes are of a class table with a null row (class_dropout_prob > 0)
        extra.update(num_classes=_dims(sd, "cls_embedding.embedding_table.weight")[0] - 1, null_class=True)
    with torch.device("meta"):
        return GPT(gpt_config(name, **extra))


def _shape_checks(section: dict, label: str, build) -> list[Check]:
    checks = []
    for name, ref in section.items():
        try:
            model = build(name, ref["state_dict"])
        except (ValueError, KeyError) as e:  # an unknown config name, or shapes our configs cannot express
            checks.append(Check(f"{label} {name} cannot be built ({e})", 1, 0, "errors"))
            continue
        checks.append(Check(f"{label} {name} state dict (differences)", float(_shape_differences(model, ref)), 0,
                            "keys"))
    return checks


def check_shapes(fixture_dir: Path, tol: float) -> list[Check]:
    """Class-conditional GPT and VQ state dicts built on the meta device equal ``shapes.json``."""
    from dataclasses import replace

    from masc_llamagen.tokenizer.vq import VQModel, get_vq_config

    ref = _json(fixture_dir / "shapes.json")

    def build_vq(name, sd):
        size, dim = _dims(sd, "quantize.embedding.weight")
        cfg = replace(get_vq_config(name), codebook_size=size, codebook_embed_dim=dim)
        with torch.device("meta"):
            return VQModel(cfg)

    return (_shape_checks(ref.get("gpt", {}), "c2i", lambda n, sd: _meta_gpt(n, sd, "c2i"))
            + _shape_checks(ref.get("vq", {}), "vq", build_vq))


def check_t2i_shapes(fixture_dir: Path, tol: float) -> list[Check]:
    """Caption-conditional GPT state dicts built on the meta device equal ``t2i_shapes.json``."""
    ref = _json(fixture_dir / "t2i_shapes.json")
    return _shape_checks(ref["t2i"], "t2i", lambda n, sd: _meta_gpt(n, sd, "t2i"))


def check_vq(fixture_dir: Path, tol: float) -> list[Check]:
    from masc_llamagen.tokenizer.vq import VQConfig

    ref = _json(fixture_dir / "vq_tiny.json")
    cfg = VQConfig(**ref["config"])
    model = load_vq(fixture_dir / "vq_tiny.safetensors", cfg).float().eval()
    image = torch.tensor(ref["image"], dtype=torch.float32)
    expected = torch.tensor(ref["indices"], dtype=torch.long)
    h, w = ref["latent_hw"]
    with torch.no_grad():
        indices = model.encode(image).reshape(-1)
        decoded = model.decode_code(expected, shape=(image.shape[0], cfg.codebook_embed_dim, h, w))
    return [
        Check("vq encode indices (mismatches)", float((indices != expected).sum()), 0, "codes"),
        Check("vq decode_code (max rel err)", rel_err(decoded, torch.tensor(ref["decoded"])), tol, "rel"),
    ]


PAIRS = (("gpt_tiny", check_gpt), ("vq_tiny", check_vq), ("gpt_t2i_tiny", check_gpt_t2i))
SINGLES = (("shapes.json", check_shapes), ("t2i_shapes.json", check_t2i_shapes))


def run(fixture_dir: Path, tol: float) -> list[Check]:
    checks: list[Check] = []
    found = False
    for stem, fn in PAIRS:
        halves = [(fixture_dir / f"{stem}{ext}").is_file() for ext in (".json", ".safetensors")]
        if any(halves) and not all(halves):
            have, lack = (".json", ".safetensors") if halves[0] else (".safetensors", ".json")
            raise FileNotFoundError(f"{fixture_dir} holds {stem}{have} without {stem}{lack}; a golden model is "
                                    "the pair")
        if all(halves):
            found = True
            checks += fn(fixture_dir, tol)
    for name, fn in SINGLES:
        if (fixture_dir / name).is_file():
            found = True
            checks += fn(fixture_dir, tol)
    if not found:
        raise FileNotFoundError(
            f"{fixture_dir} holds none of the golden files: neither gpt_tiny, vq_tiny nor gpt_t2i_tiny "
            ".json+.safetensors, nor shapes.json or t2i_shapes.json; point to a directory in the golden-fixture "
            "format (see tests/fixtures/llamagen/README.md and tests/fixtures/llamagen_t2i/README.md)"
        )
    return checks


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m masc_llamagen.parity", description=__doc__.splitlines()[0])
    ap.add_argument("fixture_dir", type=Path)
    ap.add_argument("--tol", type=float, default=1e-5, help="max relative error for logits/decodes")
    args = ap.parse_args(argv)
    try:
        checks = run(args.fixture_dir, args.tol)
    except (FileNotFoundError, CheckpointError, KeyError, ValueError) as e:
        msg = f"missing field {e}" if isinstance(e, KeyError) else str(e)
        print(f"error: {msg}", file=sys.stderr)
        return 2
    for c in checks:
        print(c.line())
    bad = [c for c in checks if not c.ok]
    print(f"{len(checks) - len(bad)}/{len(checks)} checks passed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
