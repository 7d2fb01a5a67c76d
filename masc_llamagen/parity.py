"""Golden-fixture parity: prove our GPT and VQ reproduce upstream LlamaGen's outputs.

    python -m masc_llamagen.parity FIXTURE_DIR [--tol 1e-5]

FIXTURE_DIR holds ``gpt_tiny.{json,safetensors}`` and/or ``vq_tiny.{json,safetensors}`` in the format described
in ``tests/fixtures/llamagen/README.md``. Everything (config, grid, vocabulary, cfg scales, batch) is read from
the files. Exits 1 on any mismatch, 2 when the directory holds neither pair.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from masc_llamagen.checkpoint import CheckpointError, load_gpt, load_vq


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
        return f"{'ok  ' if self.ok else 'FAIL'}  {self.name:<34} {self.value:.3g} {self.unit} (limit {self.limit:g})"


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


def run(fixture_dir: Path, tol: float) -> list[Check]:
    checks: list[Check] = []
    found = False
    for stem, fn in (("gpt_tiny", check_gpt), ("vq_tiny", check_vq)):
        if (fixture_dir / f"{stem}.json").is_file() and (fixture_dir / f"{stem}.safetensors").is_file():
            found = True
            checks += fn(fixture_dir, tol)
    if not found:
        raise FileNotFoundError(
            f"{fixture_dir} holds neither gpt_tiny.json+.safetensors nor vq_tiny.json+.safetensors; "
            "point to a directory in the golden-fixture format (see tests/fixtures/llamagen/README.md)"
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
