"""Checks that need only a checkpoint's config (and the names of its files), made before any weight is read or the
engine is built, so that a request that cannot work fails in a moment with the reason, not after the model loaded:
a model that does not generate, a generation cache Hermes cannot size, a prompt longer than the model's positions.
(Text without a tokenizer and token ids outside the vocabulary are :mod:`hermes.inputs`' checks, also made from the
config alone.)"""
from __future__ import annotations

import os
from typing import Any

from hermes.errors import InputError
from hermes.inputs import max_positions


def check_generates(config: Any, model_dir: str | os.PathLike[str], *, decoder_only: bool = False) -> None:
    """Refuse a checkpoint whose class cannot generate text (no language-model head), or with ``decoder_only``
    an encoder-decoder model.

    Raises:
        InputError: naming the class and what to use instead.
    """
    from hermes.skeleton import resolve_model_class

    cls = resolve_model_class(config)  # imports the model's code: the runtime's, not the budget's
    if not (callable(getattr(cls, "can_generate", None)) and cls.can_generate()):
        raise InputError(f"{cls.__name__} ({model_dir}) does not generate text; use `hermes run` for one forward "
                         "pass, or a checkpoint with a language-model head (e.g. *ForCausalLM)")
    if decoder_only and getattr(config, "is_encoder_decoder", False):
        raise InputError(f"{cls.__name__} ({model_dir}) is an encoder-decoder model; this runs decoder-only "
                         "language models (GPT-2, Llama, ...)")
    check_cache(config, cls)


def check_cache(config: Any, model_class: type) -> None:
    """Refuse a model whose generation cache Hermes cannot size (a kind of state it has no row for, or a cache
    transformers itself cannot build for this config), before anything is loaded.

    Raises:
        InputError: naming what cannot be sized and why.
    """
    from hermes.kvcache import Call, cache_size

    cache_size(config, model_class, Call(batch=1, prompt=1, total=2))


def check_generation_length(config: Any, prompt: int, new_tokens: int) -> None:
    """Refuse ``prompt`` + ``new_tokens`` positions beyond what a decoder-only model takes (an encoder-decoder's
    prompt goes to its encoder: not checked here)."""
    limit = None if getattr(config, "is_encoder_decoder", False) else max_positions(config)
    if limit is not None and prompt + new_tokens > limit:
        raise InputError(f"prompt ({prompt} tokens) + new tokens ({new_tokens}) = {prompt + new_tokens} exceeds the "
                         f"model's {limit} positions; shorten the prompt or ask for fewer new tokens")
