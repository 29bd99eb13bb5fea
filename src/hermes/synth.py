"""Architecture catalogue and random checkpoints with the exact real architecture.

The checkpoint is written tensor by tensor (see :class:`hermes.writer.SafetensorsWriter`), so the peak memory
while writing is about one tensor, even for GPT-J-6B (24 GB in float32).
"""
from __future__ import annotations

import functools
import logging
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hermes.atomic import atomic_write_text
from hermes.errors import HermesError
from hermes.writer import entry_nbytes, write_shards

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DEFAULT_SHARD_BYTES = 2 * 1024**3
#: Where ``hermes demo`` and the benchmarks keep the checkpoints they synthesize ($HERMES_CACHE).
DEFAULT_CACHE = Path(os.environ.get("HERMES_CACHE", Path.home() / ".cache" / "hermes"))


@dataclass(frozen=True)
class ArchSpec:
    """One entry of the architecture catalogue."""

    name: str  # catalogue name, e.g. "bert-large"
    model_class: str  # transformers class written into config.json "architectures"
    model_type: str  # transformers model_type
    config: dict[str, Any] = field(default_factory=dict)  # overrides of the config class defaults
    input_kind: str = "text"  # "text" (token ids) or "image" (pixel values)
    note: str = ""  # what real model this mirrors
    tokenizer: str = ""  # family in hermes.vocab.SOURCES whose real tokenizer it gets ("" = none: not a text model)
    chat: bool = False  # a decoder LM: its tokenizer gets a chat template

    @classmethod
    def from_name(cls, name: str) -> ArchSpec:
        try:
            return ARCHS[name]
        except KeyError:
            raise KeyError(f"unknown architecture {name!r}; choose one of: {', '.join(ARCHS)}") from None


_LLAMA_32_1B = {
    "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
    "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256, "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
    "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "high_freq_factor": 4.0,
                     "low_freq_factor": 1.0, "original_max_position_embeddings": 8192},
    "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "silu",
}
_LLAMA_31_8B = {
    **_LLAMA_32_1B, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "head_dim": 128,
    "tie_word_embeddings": False, "rope_parameters": {**_LLAMA_32_1B["rope_parameters"], "factor": 8.0},
}
_TINY_VOCAB = 1000
# A tiny model's tokenizer is the real one cut to 1000 ids, its special tokens last (hermes.tokenizer.special_ids)
_TINY_GPT2 = {"vocab_size": _TINY_VOCAB, "bos_token_id": 999, "eos_token_id": 999}
_TINY_LLAMA = {"vocab_size": _TINY_VOCAB, "bos_token_id": 995, "eos_token_id": 996}
_GPT2_TOK = {"tokenizer": "gpt-2", "chat": True}
_LLAMA_TOK = {"tokenizer": "llama-bpe", "chat": True}

ARCHS: dict[str, ArchSpec] = {a.name: a for a in [
    ArchSpec("bert-large", "BertModel", "bert",
             {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096},
             note="bert-large-uncased (335M parameters)", tokenizer="bert"),
    ArchSpec("gpt2", "GPT2LMHeadModel", "gpt2", {}, note="gpt2 base (124M parameters, tied lm_head)", **_GPT2_TOK),
    ArchSpec("vit-large", "ViTModel", "vit",
             {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096,
                  "image_size": 224, "patch_size": 16}, input_kind="image", note="google/vit-large-patch16-224 (304M)"),
    ArchSpec("gpt-j-6b", "GPTJForCausalLM", "gptj",
             {"n_embd": 4096, "n_layer": 28, "n_head": 16, "rotary_dim": 64, "vocab_size": 50400, "n_positions": 2048,
                  "tie_word_embeddings": False}, note="EleutherAI/gpt-j-6b (6.05B parameters)", **_GPT2_TOK),
    ArchSpec("llama-3.2-1b", "LlamaForCausalLM", "llama", _LLAMA_32_1B,
             note="meta-llama/Llama-3.2-1B (1.24B parameters, tied lm_head, llama3 RoPE scaling)", **_LLAMA_TOK),
    ArchSpec("llama-3.1-8b", "LlamaForCausalLM", "llama", _LLAMA_31_8B,
             note="meta-llama/Llama-3.1-8B (8.03B parameters, 16 GB in bfloat16)", **_LLAMA_TOK),
    ArchSpec("tiny-bert", "BertModel", "bert",
             dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128,
                  max_position_embeddings=128, vocab_size=_TINY_VOCAB), tokenizer="bert"),
    ArchSpec("tiny-gpt2", "GPT2LMHeadModel", "gpt2", dict(n_embd=64, n_layer=3, n_head=4, n_positions=128,
                                                          **_TINY_GPT2), **_GPT2_TOK),
    ArchSpec("tiny-vit", "ViTModel", "vit",
             {"hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4, "intermediate_size": 128,
              "image_size": 32, "patch_size": 8}, input_kind="image"),
    ArchSpec("tiny-gptj", "GPTJForCausalLM", "gptj",
             dict(n_embd=64, n_layer=3, n_head=4, rotary_dim=8, n_positions=128, tie_word_embeddings=False,
                  **_TINY_GPT2), **_GPT2_TOK),
    ArchSpec("tiny-llama", "LlamaForCausalLM", "llama",
             dict(_LLAMA_32_1B, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                  rope_parameters=dict(_LLAMA_32_1B["rope_parameters"], original_max_position_embeddings=64),
                  **_TINY_LLAMA), **_LLAMA_TOK),
]}


def build_config(spec: ArchSpec, dtype: torch.dtype = torch.float32) -> Any:
    """The transformers config object of an architecture."""
    from transformers import AutoConfig

    config = AutoConfig.for_model(spec.model_type, **spec.config)
    config.architectures = [spec.model_class]
    config.dtype = dtype
    return config


def checkpoint_entries(config: Any) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """(name, dtype, shape) of every tensor a Hugging Face ``save_pretrained`` of this config would write:
    parameters and persistent buffers, tied copies left out, under the names transformers writes to disk (its
    conversion mapping reversed: ViT's ``encoder.layer.N.attention.attention.query``, not the internal
    ``layers.N.attention.q_proj``)."""
    return [(disk, dt, shape) for disk, _, dt, shape in _entries(config)]


def _entries(config: Any) -> list[tuple[str, str, torch.dtype, tuple[int, ...]]]:
    """(name on disk, name in the model, dtype, shape) of every tensor ``save_pretrained`` writes."""
    from hermes.skeleton import build_skeleton  # local import: it imports transformers lazily too

    model = build_skeleton(config)
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    entries = [(n, p.dtype, tuple(p.shape)) for n, p in model.named_parameters(remove_duplicate=False)
               if n not in tied]
    persistent = _persistent_buffers(model)
    entries += [(n, b.dtype, tuple(b.shape)) for n, b in model.named_buffers() if n in persistent]
    to_disk = _disk_names(model)
    return [(to_disk(n), n, dt, shape) for n, dt, shape in entries]


def _disk_names(model: torch.nn.Module) -> Callable[[str], str]:
    """Model tensor name -> the name ``save_pretrained`` writes (transformers' conversion mapping, reversed)."""
    from hermes.checkpoint import weight_transforms

    renamings, converters, rename_source_key = weight_transforms(model, save=True)
    if rename_source_key is None:
        return lambda n: n

    def to_disk(name: str) -> str:
        disk, pattern = rename_source_key(name, [], converters)
        if pattern is not None:
            raise ValueError(f"{name} is split on save by transformers ({pattern}); hermes synth writes only "
                             "architectures whose tensors are renamed, not converted")
        for r in renamings:
            disk, _ = r.rename_source_key(disk)
        return disk

    return to_disk


def _persistent_buffers(model: torch.nn.Module) -> set[str]:
    out = set()
    for mname, module in model.named_modules():
        for bname in module._buffers:
            if bname not in module._non_persistent_buffers_set:
                out.add(f"{mname}.{bname}" if mname else bname)
    return out


_NORM_RE = re.compile(r"(norm|ln_\w+|ln_f|LayerNorm)\.(weight|bias)$", re.IGNORECASE)


def random_tensor(name: str, dtype: torch.dtype, shape: tuple[int, ...], generator: torch.Generator,
                  std: float) -> torch.Tensor:
    """Initial values like a freshly initialised model: norms (1, 0), biases 0, matrices N(0, std)."""
    if _NORM_RE.search(name):
        return (torch.ones if name.endswith("weight") else torch.zeros)(shape, dtype=dtype)
    if not dtype.is_floating_point:
        return torch.zeros(shape, dtype=dtype)
    if name.endswith("bias"):
        return torch.zeros(shape, dtype=dtype)
    return (torch.randn(shape, generator=generator, dtype=torch.float32) * std).to(dtype)


def synthesize(arch: str, out_dir: str | os.PathLike[str], *, dtype: str = "float32", seed: int = 0,
               shard_bytes: int = DEFAULT_SHARD_BYTES, overwrite: bool = False, tokenizer: bool = True,
               progress: Callable[[int, int], None] | None = None) -> Path:
    """Write a Hugging Face checkpoint of ``arch`` with random weights into ``out_dir``.

    Args:
        arch: a name from :data:`ARCHS`.
        out_dir: directory to create (files in it are replaced).
        dtype: "float32", "float16" or "bfloat16".
        seed: seed of the random weights; the same seed gives the same bytes.
        shard_bytes: files larger than this are split into shards with a ``model.safetensors.index.json``.
        overwrite: replace a checkpoint already in ``out_dir`` (else that is an error).
        tokenizer: write the real tokenizer of a text model (:mod:`hermes.tokenizer`), cut to its vocabulary,
            with a chat template for decoder LMs; where its vocabulary cannot be fetched, a warning is logged and
            the checkpoint is written without one.
        progress: called as ``progress(bytes_done, bytes_total)`` after each tensor.

    Returns:
        The checkpoint directory.
    """
    spec = ArchSpec.from_name(arch)
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of: {', '.join(DTYPES)}")
    tdtype = DTYPES[dtype]
    if not overwrite and synthesized_as(out_dir) == (arch, dtype, seed):  # already there: keep it, fill gaps
        out = Path(out_dir)
        if tokenizer and spec.tokenizer and not (out / "tokenizer.json").is_file():
            _write_tokenizer(out, spec, build_config(spec, tdtype))
        log.info("%s already holds %s (%s, seed %d); kept", out, arch, dtype, seed)
        return out
    created = not Path(out_dir).exists()
    out = _checkpoint_dir(Path(out_dir), overwrite=overwrite)
    try:
        config = build_config(spec, tdtype)
        named = _entries(config)
        internal = {disk: n for disk, n, _, _ in named}  # values are seeded by the model's name: stable on disk
        entries = [(disk, tdtype if dt.is_floating_point else dt, s) for disk, _, dt, s in named]
        metadata = {"format": "pt", "hermes_arch": arch, "hermes_seed": str(seed)}
        std = float(getattr(config, "initializer_range", 0.02))
        plan = {disk: (dt, shape, functools.partial(_random_parts, internal[disk], dt, shape, seed, std))
                for disk, dt, shape in entries}
        write_shards(out, plan, shard_bytes=shard_bytes, metadata=metadata, progress=progress)
        if tokenizer and spec.tokenizer:
            _write_tokenizer(out, spec, config)
        atomic_write_text(out / "config.json", config.to_json_string())  # last: it marks a whole checkpoint
    except BaseException:
        if created:  # interrupted or failed: leave no directory behind that we made
            shutil.rmtree(out, ignore_errors=True)
        raise
    log.info("wrote %s (%s, %d tensors, %d bytes) to %s", arch, dtype, len(entries),
             sum(entry_nbytes(e) for e in entries), out)
    return out


def synthesized_as(path: str | os.PathLike[str]) -> tuple[str, str, int] | None:
    """(arch, dtype, seed) of a complete checkpoint written by :func:`synthesize` at ``path``, else None."""
    import json

    from safetensors import safe_open

    path = Path(path)
    try:
        dtype = json.loads((path / "config.json").read_text()).get("dtype")
        index = path / "model.safetensors.index.json"
        first = (sorted(set(json.loads(index.read_text())["weight_map"].values()))[0] if index.is_file()
                 else "model.safetensors")
        with safe_open(path / first, framework="pt") as f:
            meta = f.metadata() or {}
        return meta["hermes_arch"], str(dtype), int(meta["hermes_seed"])
    except (OSError, ValueError, KeyError, TypeError, IndexError, RuntimeError):
        return None


def tokenizer_note(arch: str) -> str:
    """What tokenizer ``synthesize(arch, …)`` gives the model, for the CLI ("" = none: not a text model)."""
    from hermes.tokenizer import describe
    from hermes.vocab import SOURCES

    spec = ArchSpec.from_name(arch)
    if not spec.tokenizer:
        return ""
    vocab = int(spec.config.get("vocab_size", SOURCES[spec.tokenizer].size))
    return describe(spec.tokenizer, vocab, chat=spec.chat)


def _write_tokenizer(out: Path, spec: ArchSpec, config: Any) -> None:
    from hermes.inputs import max_positions
    from hermes.tokenizer import write_tokenizer

    try:
        info = write_tokenizer(out, spec.tokenizer, vocab_size=int(config.vocab_size),
                               max_positions=max_positions(config), chat=spec.chat)
    except HermesError as exc:  # offline: the weights are still worth having; say how to get text later
        log.warning("no tokenizer written (%s); token ids still work (--prompt-ids); `hermes synth --force` "
                    "writes it once the vocabulary can be fetched", exc)
        return
    log.info("tokenizer: %s", info.description)


def _checkpoint_dir(out: Path, *, overwrite: bool) -> Path:
    """``out``, created and writable, and not holding a checkpoint unless ``overwrite``."""
    if (out / "config.json").exists() and not overwrite:
        raise HermesError(f"{out} already holds a checkpoint; pick another directory, or pass --force "
                          "(overwrite=True) to replace it")
    try:
        out.mkdir(parents=True, exist_ok=True)
        if not os.access(out, os.W_OK):
            raise PermissionError(f"{out} is not writable")
    except OSError as exc:
        raise HermesError(f"cannot write a checkpoint into {out}: {exc.strerror or exc}; pick a directory you "
                          "can write to") from exc
    return out


def _random_parts(model_name: str, dtype: torch.dtype, shape: tuple[int, ...], seed: int,
                  std: float) -> list[torch.Tensor]:
    """One tensor's random values, seeded by its name in the model (stable across renames on disk)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + _stable_hash(model_name))
    return [random_tensor(model_name, dtype, shape, g, std)]


def _stable_hash(name: str) -> int:
    h = 0
    for ch in name.encode():
        h = (h * 131 + ch) % 2_147_483_647
    return h
