"""Model inputs from what a user gives on the command line: text, token ids, an image, or random."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from hermes.errors import HermesError, InputError
from hermes.memory import release_free_heap


def input_kind(config: Any) -> str:
    """What a model's forward takes: "image" (pixel values), "audio" (Whisper's log-mel features, wav2vec2's
    waveform), "text+image" (CLIP: token ids and pixel values), else "text" (token ids)."""
    if getattr(config, "vision_config", None) is not None and getattr(config, "text_config", None) is not None:
        return "text+image"
    if getattr(config, "num_mel_bins", None) or getattr(config, "conv_dim", None):
        return "audio"
    return "image" if getattr(config, "image_size", None) and getattr(config, "num_channels", None) else "text"


def text_config(config: Any) -> Any:
    """The config holding the vocabulary (a multimodal model's text config; the decoder's for encoder-decoders)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _decoder_start(config: Any, batch: int) -> dict[str, torch.Tensor]:
    """An encoder-decoder's forward also needs decoder tokens: its decoder start token."""
    if not getattr(config, "is_encoder_decoder", False):
        return {}
    start = getattr(config, "decoder_start_token_id", None)
    if not isinstance(start, int):
        start = getattr(config, "pad_token_id", None) or 0
    return {"decoder_input_ids": torch.full((batch, 1), start, dtype=torch.long)}


def _random_inputs(config: Any, kind: str, seq_len: int, batch: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    if kind == "audio":
        if getattr(config, "num_mel_bins", None):  # Whisper: a fixed 2 x max_source_positions frames
            source = getattr(config, "max_source_positions", None)
            frames = 2 * (source if isinstance(source, int) and source > 0 else 1500)
            out["input_features"] = torch.randn(batch, config.num_mel_bins, frames, generator=g)
        else:  # a raw waveform: seq_len frames of 320 samples (wav2vec2's stride)
            out["input_values"] = torch.randn(batch, max(400, 320 * seq_len), generator=g)
        return {**out, **_decoder_start(config, batch)}
    if kind in ("image", "text+image"):
        vc = getattr(config, "vision_config", None) or config
        size = vc.image_size if isinstance(vc.image_size, int) else vc.image_size[0]
        out["pixel_values"] = torch.randn(batch, vc.num_channels, size, size, generator=g)
    if kind in ("text", "text+image"):
        ids = torch.randint(0, text_config(config).vocab_size, (batch, seq_len), generator=g)
        check_token_ids(ids, text_config(config))
        out |= {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return {**out, **_decoder_start(config, batch)}


def max_positions(config: Any) -> int | None:
    """The most positions a model takes, or None where it sets no limit: a missing, non-integer or non-positive
    value (XLNet's ``max_position_embeddings`` is -1: relative positions, no table)."""
    for attr in ("max_position_embeddings", "n_positions"):
        v = getattr(config, attr, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def prompt_batch(model_dir: str | os.PathLike[str], config: Any, *, texts: list[str] | None = None,
                 ids: list[list[int]] | None = None, random_len: int | None = None, batch: int = 1,
                 seed: int = 0) -> dict[str, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` of one or more prompts for ``generate``, left-padded (what causal
    models need); exactly one of texts / ids / random_len (``batch`` random prompts)."""
    if sum(x is not None for x in (texts, ids, random_len)) != 1:
        raise InputError("give the prompt one way: --prompt, --prompt-ids, --prompts-file or --random-prompt")
    if texts is not None:
        rows = [tokenize(model_dir, t)[0].tolist() for t in texts]
    elif ids is not None:
        rows = [list(r) for r in ids]
    else:
        if random_len is None or random_len < 1 or batch < 1:
            raise InputError(f"--random-prompt needs a length >= 1 and --batch >= 1, got {random_len}, {batch}")
        g = torch.Generator().manual_seed(seed)
        rows = torch.randint(0, config.vocab_size, (batch, random_len), generator=g).tolist()
    if not rows or any(not r for r in rows):
        raise InputError("a prompt has no tokens; give at least one token per prompt")
    width = max(len(r) for r in rows)
    pad = pad_token_id(config)
    input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
    check_token_ids(input_ids, config)
    return {"input_ids": input_ids, "attention_mask": mask}


def prompts_from_file(path: str | os.PathLike[str]) -> list[str]:
    """The prompts of a text file, one per non-blank line."""
    try:
        texts = [line for line in Path(path).read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise HermesError(f"cannot read prompts file {path}: {exc}") from exc
    if not texts:
        raise HermesError(f"prompts file {path} has no prompt (one per line)")
    return texts


def pad_token_id(config: Any) -> int:
    """The id used to left-pad prompts: the model's pad token, else its end-of-sequence token, else 0."""
    for attr in ("pad_token_id", "eos_token_id"):
        v = getattr(config, attr, None)
        if isinstance(v, list):
            v = v[0] if v else None
        if isinstance(v, int):
            return v
    return 0


def build_inputs(model_dir: str | os.PathLike[str], config: Any, *, text: str | None = None,
                 input_ids: list[int] | None = None, image: str | os.PathLike[str] | None = None,
                 random_seq_len: int | None = None, batch: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
    """Tensors for one forward pass; exactly one of text / input_ids / image / random_seq_len.

    Raises:
        InputError: the input does not fit the model (empty text, ids outside the vocabulary, too long, ...).
    """
    given = [x is not None for x in (text, input_ids, image, random_seq_len)]
    if sum(given) != 1:
        raise InputError("give exactly one input: --text, --input-ids, --image or --random-input")
    kind = input_kind(config)
    if random_seq_len is not None and kind != "text":
        if random_seq_len < 1:
            raise InputError(f"--random-input needs a sequence length >= 1, got {random_seq_len}")
        return _random_inputs(config, kind, random_seq_len, batch, seed)
    if image is not None:
        if kind != "image":
            raise InputError(f"this model ({config.model_type}) takes {kind}, not an image alone; use "
                             + ("--text or --input-ids" if kind == "text" else "--random-input N"))
        return {"pixel_values": load_image(Path(image), config)}
    if kind != "text":
        raise InputError(f"this model ({config.model_type}) takes {kind}; use "
                         + ("--image PATH or " if kind == "image" else "") + "--random-input N")
    if text is not None:
        ids = tokenize(model_dir, text)
    elif input_ids is not None:
        ids = torch.tensor([input_ids], dtype=torch.long)
    else:
        if random_seq_len is None or random_seq_len < 1:
            raise InputError(f"--random-input needs a sequence length >= 1, got {random_seq_len}")
        return _random_inputs(config, kind, random_seq_len, batch, seed)
    check_token_ids(ids, text_config(config))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), **_decoder_start(config, ids.shape[0])}


def check_token_ids(ids: torch.Tensor, config: Any) -> None:
    if ids.numel() == 0 or ids.shape[-1] == 0:
        raise InputError("the input has no tokens; give at least one token")
    vocab = getattr(config, "vocab_size", None)
    if vocab is not None and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise InputError(f"token ids must lie in [0, {vocab - 1}] (the model's vocabulary), got values in "
                         f"[{int(ids.min())}, {int(ids.max())}]")
    limit = max_positions(config)
    if limit is not None and ids.shape[-1] > limit:
        raise InputError(f"the input has {ids.shape[-1]} tokens but the model takes at most {limit} "
                         "(max_position_embeddings); shorten the input")


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model")


def load_tokenizer(model_dir: str | os.PathLike[str]) -> Any:
    """The checkpoint's own tokenizer (never a downloaded or invented one).

    Raises:
        InputError: the directory has no usable tokenizer.
    """
    if not has_tokenizer(model_dir):
        raise InputError(f"{model_dir}: this checkpoint has no tokenizer (tokenizer.json / tokenizer_config.json); "
                         "pass token ids instead (run: --input-ids 1,2,3; generate: --prompt-ids 1,2,3), or add the "
                         "tokenizer files of the model to the directory")
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        raise InputError(f"{model_dir} has no usable tokenizer for text ({str(exc).splitlines()[0]}); "
                         "give token ids (--input-ids / --prompt-ids 1,2,3) or random ones instead") from exc
    release_free_heap()  # the load's transient memory (150 MiB for Llama 3) would stay in RSS
    return tokenizer


def has_tokenizer(model_dir: str | os.PathLike[str]) -> bool:
    return any((Path(model_dir) / f).is_file() for f in _TOKENIZER_FILES)


def tokenize(model_dir: str | os.PathLike[str], text: str) -> torch.Tensor:
    if not text.strip():
        raise InputError("the text is empty; give some words to encode")
    return load_tokenizer(model_dir)(text, return_tensors="pt")["input_ids"]


def load_image(path: Path, config: Any) -> torch.Tensor:
    """Resize to the model's image size and normalize with mean = std = 0.5, as ViT's processor does."""
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(path).convert("RGB")
    except FileNotFoundError:
        raise InputError(f"image {path} does not exist") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise InputError(f"{path} is not an image Pillow can read ({exc})") from exc
    size = config.image_size
    img = img.resize((size, size), Image.Resampling.BILINEAR)
    x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(size, size, 3)
    x = x.permute(2, 0, 1).float().div(255.0)
    return ((x - 0.5) / 0.5).unsqueeze(0)


def output_tensors(output: Any) -> dict[str, torch.Tensor]:
    """The tensor fields of a transformers ModelOutput (or a plain tensor / tuple)."""
    if isinstance(output, torch.Tensor):
        return {"output": output}
    if hasattr(output, "items"):
        return {k: v.detach().contiguous() for k, v in output.items() if isinstance(v, torch.Tensor)}
    return {f"output_{i}": v.detach().contiguous() for i, v in enumerate(output) if isinstance(v, torch.Tensor)}
