"""The text side of ``hermes serve``: the checkpoint's tokenizer, run off the event loop (one thread encodes, one
decodes: at most one prompt is tokenized at a time), and the length check that refuses a prompt that cannot fit
before it is tokenized whole."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from hermes.memory import release_free_heap
from hermes.serve.schemas import ServeError

log = logging.getLogger(__name__)


def check_length(prompt: int, max_new_tokens: int, max_positions: int, more: str = "") -> None:
    """Refuse prompt + max_new_tokens beyond the positions held per request (``more``: " or more" when ``prompt``
    is a lower bound)."""
    total = prompt + max_new_tokens
    if total > max_positions:
        raise ServeError(
            f"prompt ({prompt}{more} tokens) + max_tokens ({max_new_tokens}) = {total}{more} exceeds the "
            f"{max_positions} positions this server holds per request (the model's, or its KV cache's); "
            "shorten the prompt or ask for fewer tokens", param="max_tokens", code="context_length_exceeded")


def _tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    if not any((model_dir / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json",
                                                   "tokenizer.model")):
        return None
    try:
        return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError) as exc:
        log.warning("the tokenizer of %s cannot be loaded (%s); prompts must be token ids", model_dir, exc)
        return None


def _longest_token(tokenizer: Any) -> int:
    """The most characters one token of ``tokenizer`` stands for (an upper bound: a vocabulary entry's length,
    byte-level and byte-fallback entries included)."""
    if tokenizer is None:
        return 1
    try:
        return max(4, max(len(t) for t in tokenizer.get_vocab()))
    except (AttributeError, TypeError, ValueError, NotImplementedError):
        return 64


class Text:
    """Prompts to token ids and answers to text with the checkpoint's tokenizer (None: token ids only)."""

    def __init__(self, model_dir: Path, model_name: str, max_positions: int) -> None:
        self.tokenizer = _tokenizer(model_dir)
        self.token_chars = _longest_token(self.tokenizer)
        release_free_heap()  # what loading the tokenizer freed (150 MiB for Llama 3) leaves RSS before the budget
        self.model_name, self.max_positions = model_name, max_positions
        self._encoder = ThreadPoolExecutor(1, thread_name_prefix="hermes-encode")
        self._decoder = ThreadPoolExecutor(1, thread_name_prefix="hermes-decode")

    def close(self) -> None:
        self._encoder.shutdown(wait=False, cancel_futures=True)
        self._decoder.shutdown(wait=False, cancel_futures=True)

    async def encode_async(self, prompt: Any, max_new_tokens: int) -> list[int]:
        """:meth:`encode` in the encoding thread (the event loop serves others meanwhile)."""
        return await asyncio.get_running_loop().run_in_executor(self._encoder, self.encode, prompt, max_new_tokens)

    async def chat_ids_async(self, messages: Any, max_new_tokens: int) -> list[int]:
        return await asyncio.get_running_loop().run_in_executor(self._encoder, self.chat_ids, messages,
                                                                max_new_tokens)

    async def decode_async(self, ids: list[int]) -> str:
        return await asyncio.get_running_loop().run_in_executor(self._decoder, self.decode, ids)

    def encode(self, prompt: Any, max_new_tokens: int = 0) -> list[int]:
        if isinstance(prompt, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in prompt):
            return list(prompt)
        if isinstance(prompt, list) and len(prompt) == 1:
            return self.encode(prompt[0], max_new_tokens)
        if not isinstance(prompt, str):
            raise ServeError("prompt must be a string or a list of token ids (one prompt per request)",
                             param="prompt")
        if self.tokenizer is None:
            raise ServeError(f"{self.model_name} has no tokenizer; send the prompt as a list of token ids",
                             param="prompt")
        return self._tokenize(prompt, max_new_tokens, special=True)

    def _tokenize(self, text: str, max_new_tokens: int, *, special: bool) -> list[int]:
        """``text``'s token ids, refused before its whole is tokenized when it cannot fit: a token covers at most
        ``token_chars`` characters, and a prefix has at most one token more than the whole text has for it, so
        prefixes twice as long each time are tokenized until one is too long (tokenizing 2 MB of text would take
        ~1 GB)."""
        room = self.max_positions - max_new_tokens
        if len(text) > max(room, 0) * self.token_chars:
            check_length(-(-len(text) // self.token_chars), max_new_tokens, self.max_positions, more=" or more")
        size = max(room, 1) * 4
        while size < len(text):
            ids = self.tokenizer(text[:size], add_special_tokens=special)["input_ids"]
            if len(ids) - 1 > room:
                check_length(len(ids) - 1, max_new_tokens, self.max_positions, more=" or more")
            size *= 2
        return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    def chat_ids(self, messages: Any, max_new_tokens: int = 0) -> list[int]:
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages):
            raise ServeError("messages must be a non-empty list of {role, content} objects with string content",
                             param="messages")
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise ServeError(f"{self.model_name} has no chat template in its tokenizer; use /v1/completions",
                             param="messages")
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self._tokenize(text, max_new_tokens, special=False)

    def decode(self, ids: list[int]) -> str:
        if self.tokenizer is None:
            return "".join(f" {i}" for i in ids)
        return self.tokenizer.decode(ids, skip_special_tokens=True)
