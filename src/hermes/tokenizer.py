"""A working tokenizer for every synthesized text model: a real one, cut to the model's vocabulary size.

The vocabularies are llama.cpp's vocab-only GGUF files (:mod:`hermes.vocab`), rebuilt as Hugging Face
``tokenizers`` objects: byte-level BPE (GPT-2, Llama 3) with the pre-tokenizer of the original, WordPiece (BERT)
with its normalizer. A model whose vocabulary is smaller than the tokenizer's (the ``tiny-*`` models) gets the
same tokenizer cut to its size: a BPE keeps its 256 bytes and first merges (any text still encodes), WordPiece
keeps the ASCII characters and the most frequent pieces; the special tokens move to the last ids
(:func:`special_ids`). Decoder LMs get a chat template (Llama 3's own for Llama; a plain "Role: text" one for
GPT-2, which has none). Built tokenizers are cached under the vocabulary directory.
"""
from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hermes.atomic import atomic_dir
from hermes.errors import HermesError
from hermes.vocab import SOURCES, VocabSource, ensure_vocab

log = logging.getLogger(__name__)

# Llama 3's pre-tokenizer split (Meta's tokenizer.json; llama.cpp's LLAMA_VOCAB_PRE_TYPE_LLAMA3)
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
#: GPT-2 has no chat format: a plain one, stated as Hermes's own.
PLAIN_CHAT = ("{% for message in messages %}{{ message['role'] | capitalize }}: {{ message['content'] }}\n"
              "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}")
#: Special tokens of each family, in their order at the end of a cut vocabulary; the first is BOS, the second EOS.
SPECIALS = {
    "gpt-2": ("<|endoftext|>",),
    "llama-bpe": ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                  "<|eot_id|>"),
    "bert": ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"),  # the first ids, as in BERT
}
_FULL_IDS = {"gpt-2": {"<|endoftext|>": 50256}, "llama-bpe": {"<|begin_of_text|>": 128000, "<|end_of_text|>": 128001}}
_CONTROL = 3  # GGUF token type of special (control) tokens
FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


@dataclass(frozen=True)
class TokenizerInfo:
    """What was written into a checkpoint."""

    source: str  # family in hermes.vocab.SOURCES
    description: str  # e.g. "GPT-2's byte-level BPE (50257 tokens), cut to the model's 1000 ids"
    vocab_size: int  # tokens in the written tokenizer
    chat: bool  # a chat template was written


def special_ids(source: str, vocab_size: int, full_size: int) -> dict[str, int]:
    """Ids of the family's special tokens in a tokenizer of ``vocab_size`` cut from one of ``full_size``."""
    if source == "bert":
        full = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103}
        return full if vocab_size >= full_size else {t: i for i, t in enumerate(SPECIALS[source])}
    if vocab_size >= full_size:
        return _FULL_IDS[source]
    specials = SPECIALS[source]
    return {t: vocab_size - len(specials) + i for i, t in enumerate(specials)}


def write_tokenizer(out: Path, source: str, *, vocab_size: int, max_positions: int | None,
                    chat: bool) -> TokenizerInfo:
    """Write the tokenizer of ``source`` cut to ``vocab_size`` (and a chat template if ``chat``) into ``out``."""
    built = _built(source, vocab_size, max_positions, chat)
    for name in FILES:
        if (built / name).exists():
            shutil.copyfile(built / name, out / name)
    return TokenizerInfo(source, describe(source, vocab_size), min(vocab_size, SOURCES[source].size), chat)


def describe(source: str, vocab_size: int, *, chat: bool = False) -> str:
    """The tokenizer of ``source`` cut to ``vocab_size``, in words (and its chat template when ``chat``)."""
    src = SOURCES[source]
    cut = f", cut to the model's {vocab_size} ids" if vocab_size < src.size else ""
    template = ("; chat template: Llama 3's" if src.chat_template else "; chat template: plain 'Role: text' lines"
                ) if chat else ""
    return f"{src.tokenizer}{cut}{template}"


def _built(source: str, vocab_size: int, max_positions: int | None, chat: bool) -> Path:
    """The cached directory of a built tokenizer; built (atomically) if missing."""
    vocab = ensure_vocab()
    path = vocab / "built" / f"{source}-{vocab_size}-{max_positions or 0}{'-chat' if chat else ''}"
    if not (path / "tokenizer_config.json").is_file():
        with atomic_dir(path, overwrite=True) as tmp:
            tok = build(vocab, SOURCES[source], vocab_size=vocab_size, max_positions=max_positions, chat=chat)
            tok.save_pretrained(tmp)
        log.info("built the %s tokenizer for %d ids into %s", source, vocab_size, path)
    return path


def build(vocab: Path, src: VocabSource, *, vocab_size: int, max_positions: int | None = None,
          chat: bool = False) -> Any:
    """A transformers fast tokenizer of ``src``, cut to ``vocab_size`` tokens."""
    from transformers import PreTrainedTokenizerFast

    tokens, merges, types = read_gguf(vocab / src.gguf)
    if src.kind == "bpe":
        tok = _byte_level_bpe(src.name, tokens, merges, types, vocab_size)
    else:
        tok = _wordpiece(tokens, vocab_size)
    ids = special_ids(src.name, vocab_size, len(tokens))
    names = list(ids)
    kwargs: dict[str, Any] = {}
    if src.kind == "bpe":
        kwargs = {"bos_token": names[0], "eos_token": names[1] if len(names) > 1 else names[0]}
    else:
        kwargs = dict(zip(("pad_token", "unk_token", "cls_token", "sep_token", "mask_token"), SPECIALS["bert"],
                          strict=True))
    if chat:
        kwargs["chat_template"] = ((vocab / src.chat_template).read_text(encoding="utf-8") if src.chat_template
                                   else PLAIN_CHAT)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=max_positions or 1_000_000_000_000,
                                   clean_up_tokenization_spaces=False, **kwargs)
    return fast


def read_gguf(path: Path) -> tuple[list[str], list[str], list[int]]:
    """(tokens, merges, token types) of a vocab-only GGUF file."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except (OSError, ValueError) as exc:
        raise HermesError(f"cannot read the vocabulary {path}: {exc}; delete it and run `hermes synth` again "
                          "(it is fetched anew)") from exc

    def strings(key: str) -> list[str]:
        f = reader.fields.get(key)
        return [] if f is None else [bytes(f.parts[i]).decode("utf-8") for i in f.data]

    types = reader.fields["tokenizer.ggml.token_type"]
    return strings("tokenizer.ggml.tokens"), strings("tokenizer.ggml.merges"), [int(types.parts[i][0])
                                                                                 for i in types.data]


def _byte_level_bpe(source: str, tokens: list[str], merges: list[str], types: list[int], vocab_size: int) -> Any:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    specials = SPECIALS[source]
    ids = special_ids(source, vocab_size, len(tokens))
    if vocab_size >= len(tokens):
        vocab = {t: i for i, t in enumerate(tokens)}
        added = [t for t, kind in zip(tokens, types, strict=True) if kind == _CONTROL]
    else:
        keep = vocab_size - len(specials)
        vocab = {t: i for i, t in enumerate(tokens[:keep])}
        vocab.update(ids)
        added = list(specials)
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    pairs = [(a, b) for a, b in pairs if a in vocab and b in vocab and a + b in vocab]
    llama = source == "llama-bpe"
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, ignore_merges=llama, fuse_unk=False, byte_fallback=False))
    if llama:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        bos = specials[0]
        tok.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1",
                                          special_tokens=[(bos, ids[bos])])])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(added)
    return tok


def _wordpiece(tokens: list[str], vocab_size: int) -> Any:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    pieces = [_bert_piece(t) for t in tokens]  # llama.cpp's phantom-space form back to BERT's "##" form
    if vocab_size < len(pieces):
        pieces = _frequent_pieces(pieces, vocab_size)
    vocab = {p: i for i, p in enumerate(pieces)}
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None,
                                                lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.add_special_tokens(list(SPECIALS["bert"]))
    return tok


def _bert_piece(token: str) -> str:
    if token.startswith("\u2581"):
        return token[1:]
    if token.startswith("[") and token.endswith("]"):
        return token
    return "##" + token


def _frequent_pieces(pieces: list[str], n: int) -> list[str]:
    """The specials, every ASCII character (alone and as a continuation), then pieces in BERT's order (most
    frequent first), ``n`` in all: any ASCII text still tokenizes without [UNK]."""
    known = set(pieces)
    chars = [chr(c) for c in range(33, 127) if chr(c) in known]
    out = list(SPECIALS["bert"]) + chars + [f"##{c}" for c in chars if f"##{c}" in known]
    seen = set(out)
    for p in pieces:
        if len(out) >= n:
            break
        if p not in seen and not p.startswith("[unused") and p.isascii():
            out.append(p)
            seen.add(p)
    return out[:n]
