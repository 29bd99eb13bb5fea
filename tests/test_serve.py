"""hermes serve: the OpenAI client against a real server (a subprocess on a free localhost port)."""
from __future__ import annotations

import asyncio
import http.client
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import openai
import pytest
import torch

from hermes.share import RUNTIME_SLACK_BYTES
from tests.conftest import reference_model

BUDGET = "2.5MiB"  # weights stream; KV cache of 144 positions; request memory 320 KiB
WORDS = [f"w{i}" for i in range(300)]
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}assistant : {% endif %}")


def _with_tokenizer(src: Path, dst: Path) -> Path:
    """A copy of a tiny checkpoint with a word-level tokenizer (ids inside its vocabulary) and a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    shutil.copytree(src, dst)
    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, ":": 3, "user": 4, "assistant": 5, "system": 6}
    vocab |= {w: i + 7 for i, w in enumerate(WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>", eos_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(dst)
    return dst


def _http(method: str, url: str, data: bytes | None = None, **headers: str) -> tuple[int, str]:
    headers = {"content-type": "application/json", **{k.replace("_", "-"): v for k, v in headers.items()}}
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


class Server:
    """``hermes serve`` in a subprocess; ``url`` once it listens."""

    def __init__(self, model: Path, *args: str, port: int = 0) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "hermes.cli", "serve", str(model), "--budget", BUDGET,
                                      "--port", str(port), *args], stderr=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env)
        self.lines: queue.Queue[str] = queue.Queue()
        self.log: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + 180
        self.url = ""
        while not self.url:
            try:
                line = self.lines.get(timeout=max(deadline - time.monotonic(), 0.1))
            except queue.Empty:
                self.stop()
                raise AssertionError("the server did not start within 180 s: " + "".join(self.log)) from None
            if " at http://" in line:
                self.url = line.split(" at ", 1)[1].split()[0]
            if self.proc.poll() is not None and self.lines.empty():
                raise AssertionError("the server exited: " + "".join(self.log))

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line)
            self.lines.put(line)

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url, api_key=kw.pop("api_key", "none"), max_retries=0, timeout=120, **kw)

    def metrics(self) -> dict[str, float]:
        text = _http("GET", self.url.removesuffix("/v1") + "/metrics")[1]
        return {k: float(v) for k, v in (line.split() for line in text.splitlines() if not line.startswith("#"))}

    def wait_metrics(self, check, timeout: float = 60) -> dict[str, float]:
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            if check(m) or time.monotonic() > deadline:
                return m
            time.sleep(0.2)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise


@pytest.fixture(scope="module")
def chat_model(tiny_models, tmp_path_factory) -> Path:
    return _with_tokenizer(tiny_models["tiny-gpt2"], tmp_path_factory.mktemp("serve") / "tiny-gpt2")


@pytest.fixture(scope="module")
def server(chat_model):
    s = Server(chat_model, "--max-batch", "3", "--max-queue", "1")
    yield s
    assert s.stop() == 0


@pytest.fixture(scope="module")
def reference(chat_model):
    return reference_model(chat_model)


def _solo(reference, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = reference.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


def test_completions_and_chat_with_the_openai_client_streaming_and_not(server, reference, chat_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(chat_model)
    client = server.client()
    assert [m.id for m in client.models.list().data] == ["tiny-gpt2"]
    prompt = "w1 w2 w3 w4"
    want = _solo(reference, tok(prompt)["input_ids"], 8)
    r = client.completions.create(model="tiny-gpt2", prompt=prompt, max_tokens=8, temperature=0)
    assert r.model_extra["hermes"]["token_ids"] == want
    assert r.choices[0].text == tok.decode(want, skip_special_tokens=True)
    assert r.usage.prompt_tokens == 4 and r.usage.completion_tokens == len(want)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny-gpt2", prompt=prompt, max_tokens=8, temperature=0, stream=True))
    assert streamed == r.choices[0].text
    messages = [{"role": "user", "content": "w5 w6 w7"}]
    chat_ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    chat_ids = list(chat_ids["input_ids"] if hasattr(chat_ids, "keys") else chat_ids)
    want = _solo(reference, chat_ids, 6)
    c = client.chat.completions.create(model="tiny-gpt2", messages=messages, max_tokens=6, temperature=0)
    assert c.choices[0].message.role == "assistant"
    assert c.choices[0].message.content == tok.decode(want, skip_special_tokens=True)
    assert c.choices[0].finish_reason in ("stop", "length")
    parts = list(client.chat.completions.create(model="tiny-gpt2", messages=messages, max_tokens=6, temperature=0,
                                                stream=True))
    assert "".join(p.choices[0].delta.content or "" for p in parts) == c.choices[0].message.content
    assert parts[-1].choices[0].finish_reason in ("stop", "length")
    # sampling runs too (its tokens are random; they are tokens of the vocabulary)
    s = client.completions.create(model="tiny-gpt2", prompt=[5, 6, 7], max_tokens=5, temperature=0.8, top_p=0.9)
    assert all(0 <= t < 1000 for t in s.model_extra["hermes"]["token_ids"])


def test_concurrent_requests_are_batched_and_each_equals_its_solo_generate(server, reference):
    prompts = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16, 17]]
    before = server.metrics()

    async def run() -> list[list[int]]:
        client = openai.AsyncOpenAI(base_url=server.url, api_key="none", max_retries=0, timeout=120)
        outs = await asyncio.gather(*(client.completions.create(model="tiny-gpt2", prompt=p, max_tokens=12,
                                                                temperature=0) for p in prompts))
        return [o.model_extra["hermes"]["token_ids"] for o in outs]

    got = asyncio.run(run())
    for p, g in zip(prompts, got, strict=True):
        assert g == _solo(reference, p, 12)
    m = server.metrics()
    generated = sum(len(g) for g in got)
    steps = m["hermes_steps_total"] - before["hermes_steps_total"]
    assert steps < generated  # requests shared steps (one read of the weights served several sequences)
    # the budget held: weights within the weight budget, the KV cache pool within its share, all within the budget
    assert m["hermes_weights_peak_bytes"] <= m["hermes_weight_budget_bytes"]
    assert m["hermes_weight_budget_bytes"] + m["hermes_kv_cache_bytes"] + m["hermes_activation_reserved_bytes"] \
        + m["hermes_request_memory_bytes"] + m["hermes_runtime_slack_bytes"] <= m["hermes_budget_bytes"]
    assert m["hermes_memory_held_bytes"] <= m["hermes_budget_bytes"]
    # the process: its peak RSS above the runtime within the budget and the part of the slack it could not hold
    short = RUNTIME_SLACK_BYTES - m["hermes_runtime_slack_bytes"]
    assert 0 < m["hermes_rss_peak_above_baseline_bytes"] <= m["hermes_budget_bytes"] + short


def test_a_full_queue_answers_429_and_the_server_goes_on(server):
    async def run() -> list[object]:
        client = openai.AsyncOpenAI(base_url=server.url, api_key="none", max_retries=0, timeout=120)
        calls = [client.completions.create(model="tiny-gpt2", prompt=[5, 6, 7], max_tokens=60, temperature=0)
                 for _ in range(6)]  # 3 decode + 1 waits: the rest are refused
        return await asyncio.gather(*calls, return_exceptions=True)

    results = asyncio.run(run())
    refused = [r for r in results if isinstance(r, openai.RateLimitError)]
    served = [r for r in results if not isinstance(r, Exception)]
    assert len(served) == 4 and len(refused) == 2, results
    assert "the server is full" in refused[0].message and refused[0].status_code == 429
    assert server.client().completions.create(model="tiny-gpt2", prompt=[1, 2], max_tokens=2).choices


def test_a_client_that_disconnects_mid_stream_frees_its_slot(server):
    before = server.metrics()
    body = {"model": "tiny-gpt2", "prompt": [5, 6, 7], "max_tokens": 100, "temperature": 0, "stream": True}
    url = urllib.parse.urlparse(server.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    conn.request("POST", url.path + "/completions", json.dumps(body), {"content-type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200 and r.readline().startswith(b"data: ")
    conn.close()  # the client goes away mid-stream
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)  # and one that does not wait for its answer
    conn.request("POST", url.path + "/completions", json.dumps({**body, "stream": False}),
                 {"content-type": "application/json"})
    server.wait_metrics(lambda m: m["hermes_requests_running"] > 0)
    conn.close()
    m = server.wait_metrics(lambda m: m["hermes_requests_cancelled_total"] >= before["hermes_requests_cancelled_total"]
                            + 2 and m["hermes_requests_running"] + m["hermes_requests_waiting"] == 0)
    assert m["hermes_requests_cancelled_total"] == before["hermes_requests_cancelled_total"] + 2
    assert m["hermes_requests_running"] + m["hermes_requests_waiting"] == 0
    assert server.client().completions.create(model="tiny-gpt2", prompt=[1, 2], max_tokens=2).choices


@pytest.mark.parametrize(("body", "status", "message"), [
    ({"model": "gpt-9", "prompt": [1], "max_tokens": 2}, 404, "model 'gpt-9' does not exist"),
    ({"model": "tiny-gpt2", "prompt": [1], "max_tokens": 0}, 400, "max_tokens must be an integer in [1"),
    ({"model": "tiny-gpt2", "prompt": [1], "max_tokens": 10**6}, 400, "max_tokens must be an integer in [1"),
    ({"model": "tiny-gpt2", "prompt": [1] * 120, "max_tokens": 50}, 400, "exceeds the"),
    ({"model": "tiny-gpt2", "prompt": [1], "temperature": -1}, 400, "temperature must be a number in [0, 2]"),
    ({"model": "tiny-gpt2", "prompt": [1], "top_p": 3}, 400, "top_p must be a number in"),
    ({"model": "tiny-gpt2", "prompt": [99999]}, 400, "outside the vocabulary"),
    ({"model": "tiny-gpt2", "prompt": []}, 400, "the prompt is empty"),
    ({"model": "tiny-gpt2"}, 400, "prompt is required"),
    ({"model": "tiny-gpt2", "prompt": [1], "n": 3}, 400, "n must be 1"),
    ({"model": "tiny-gpt2", "prompt": [1], "stop": ["w1"]}, 400, "stop is not supported by hermes serve"),
    ("not json", 400, "not valid JSON"),
    # FastAPI's validation against the pydantic schema: wrong types, values out of range, missing fields
    ({"model": "tiny-gpt2", "prompt": [1], "temperature": "hot"}, 400, "temperature must be a number in [0, 2], got"),
    ({"model": "tiny-gpt2", "prompt": [1], "temperature": 2.5}, 400, "temperature must be a number in [0, 2], got 2.5"),
    ({"model": "tiny-gpt2", "prompt": [1], "max_tokens": True}, 400, "max_tokens must be an integer in [1"),
    ({"model": "tiny-gpt2", "prompt": [1], "max_tokens": 2.5}, 400, "max_tokens must be an integer in [1"),
    ({"model": "tiny-gpt2", "prompt": [1], "top_k": -1}, 400, "top_k must be an integer in [0"),
    ({"model": "tiny-gpt2", "prompt": [1], "stream": "yes"}, 400, "stream must be true or false"),
    ({"model": "tiny-gpt2", "prompt": [1, "w1"]}, 400, "prompt must be a string or a list of token ids"),
    ({"model": "tiny-gpt2", "prompt": [1], "logprobs": 3}, 400, "logprobs is not supported by hermes serve"),
    ([{"prompt": [1]}], 400, "the request body must be a JSON object"),
])
def test_bad_requests_get_the_openai_error_shape_and_the_next_request_works(server, body, status, message):
    data = body if isinstance(body, str) else json.dumps(body)
    code, text = _http("POST", server.url + "/completions", data.encode())
    assert code == status, text
    err = json.loads(text)["error"]
    assert message in err["message"] and err["type"]
    assert server.client().completions.create(model="tiny-gpt2", prompt=[1, 2], max_tokens=2).choices


@pytest.mark.parametrize(("route", "body", "error"), [
    ("/completions", {"prompt": [1], "temperature": 3},
     {"message": "temperature must be a number in [0, 2], got 3", "type": "invalid_request_error",
      "param": "temperature", "code": None}),
    ("/completions", {"model": "tiny-gpt2", "max_tokens": 2},
     {"message": "prompt is required: a string or a list of token ids (one prompt per request)",
      "type": "invalid_request_error", "param": "prompt", "code": None}),
    ("/chat/completions", {"model": "tiny-gpt2"},
     {"message": "messages is required: a non-empty list of {role, content} objects with string content",
      "type": "invalid_request_error", "param": "messages", "code": None}),
    ("/chat/completions", {"messages": [{"role": "user", "content": 5}]},
     {"message": "messages must be a non-empty list of {role, content} objects with string content, got "
                 "[{'role': 'user', 'content': 5}]", "type": "invalid_request_error", "param": "messages",
      "code": None}),
])
def test_schema_validation_errors_name_the_field_and_the_fix(server, route, body, error):
    code, text = _http("POST", server.url + route, json.dumps(body).encode())
    assert (code, json.loads(text)) == (400, {"error": error})


@pytest.mark.parametrize("kind", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data", ""])
def test_a_body_that_is_not_sent_as_json_is_refused_with_the_header_to_send(server, kind):
    """A web page can send these without a CORS preflight: refused before anything is read."""
    code, text = _http("POST", server.url + "/completions", b'{"prompt": [1]}', content_type=kind)
    assert code == 415, text
    assert "sent with the header 'Content-Type: application/json'" in json.loads(text)["error"]["message"]


def test_chat_without_a_template_and_unknown_routes_are_clear_errors(server, tiny_models):
    code, text = _http("POST", server.url + "/chat/completions", b'{"model": "tiny-gpt2", "messages": "hi"}')
    assert code == 400 and "messages must be a non-empty list" in json.loads(text)["error"]["message"]
    code, text = _http("GET", server.url + "/nothing")
    assert code == 404 and json.loads(text)["error"]["type"] == "not_found_error"
    assert json.loads(_http("GET", server.url.removesuffix("/v1") + "/health")[1])["status"] == "ok"


def test_api_key_and_clean_shutdown_on_sigint(chat_model):
    s = Server(chat_model, "--api-key", "sekret")
    try:
        with pytest.raises(openai.AuthenticationError, match="invalid API key"):
            s.client(api_key="wrong").completions.create(model="tiny-gpt2", prompt=[1], max_tokens=2)
        assert s.client(api_key="sekret").completions.create(model="tiny-gpt2", prompt=[1], max_tokens=2).choices
        root = s.url.removesuffix("/v1")
        assert _http("GET", root + "/health")[0] == 200  # no key needed
        for path in ("/metrics", "/docs", "/redoc", "/openapi.json", "/v1/models"):  # every other route needs it
            code, text = _http("GET", root + path)
            assert code == 401 and json.loads(text)["error"]["code"] == "invalid_api_key", path
            assert _http("GET", root + path, authorization="Bearer sekret")[0] == 200, path
        assert _http("GET", root + "/metrics", authorization="Bearer sekreT")[0] == 401
    finally:
        code = s.stop(signal.SIGINT)
    assert code == 0 and "stopped" in "".join(s.log) and "Traceback" not in "".join(s.log)


def test_serve_refuses_a_budget_too_small_and_a_model_that_does_not_generate(tiny_models, capsys):
    from hermes.cli import main

    assert main(["serve", str(tiny_models["tiny-gpt2"]), "--budget", "300KB", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "cannot serve this model" in err and "use a budget of at least" in err
    small = str(tiny_models["tiny-gpt2"])
    assert main(["serve", small, "--budget", "2MiB", "--kv-cache", "1800KB", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "--kv-cache 1.7 MiB with its step activations" in err and "give a smaller --kv-cache" in err
    assert main(["serve", str(tiny_models["tiny-bert"]), "--budget", "2MiB", "--port", "0"]) == 2
    assert "does not generate text" in capsys.readouterr().err
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", str(tiny_models["tiny-gpt2"]), "--budget", "2MiB", "--port", str(port)]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


def _served_greedy(service, prompts: list[list[int]], n: int, *, join_later: bool = False) -> list[list[int]]:
    """The greedy tokens a started-then-stopped ``service`` gives each prompt, all submitted at once (``join_later``:
    the others once the first decodes, so that they join a running batch)."""
    from hermes.serve import Sampling

    service.start()
    try:
        async def run() -> list[list[int]]:
            queues = []
            for i, p in enumerate(prompts):
                q: asyncio.Queue = asyncio.Queue()
                service.submit(p, n, Sampling(temperature=0), q.put_nowait)
                queues.append(q)
                if join_later and i == 0:
                    while not (await q.get()).generated_tokens:
                        pass
            outs = []
            for q in queues:
                while not (out := await q.get()).is_finished():
                    pass
                outs.append(out.generated_tokens)
            return outs

        return asyncio.run(run())
    finally:
        service.stop()


@pytest.mark.parametrize("source", ["tiny-llama", "zoo:qwen2", "zoo:mistral"])
def test_service_batches_requests_that_join_while_others_decode(tiny_models, tmp_path, source):
    """Rotary positions and grouped KV heads, on hermes' synthesized Llama and on models transformers wrote itself
    (``save_pretrained``): a request joining a running batch decodes as it would alone."""
    from hermes import zoo
    from hermes.serve import Sampling, Service

    if source.startswith("zoo:"):
        path = zoo.save(next(z for z in zoo.ZOO if z.name == source[4:]), tmp_path / source[4:])
    else:
        path = tiny_models[source]
    service = Service(path, BUDGET, max_batch=4, max_queue=0)
    assert service.layout.weights < sum(u.nbytes for u in service.engine.units)  # the weights stream
    ref = reference_model(path)
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15, 16, 17, 18]]
    got = _served_greedy(service, prompts, 10, join_later=True)
    for p, g in zip(prompts, got, strict=True):
        assert g == _solo(ref, p, 10)
    with pytest.raises(Exception, match="the server is stopping"):
        service.submit([1], 1, Sampling(), lambda out: None)


def test_greedy_requests_take_the_first_of_tied_tokens_as_generate_does(tmp_path):
    """Greedy serving is transformers' greedy ``generate`` on exact ties too (common in bfloat16 logits): a head
    whose rows come in identical pairs ties every token with its neighbour; greedy takes the first (even) one.
    Served as top-k 1 sampling, transformers' top-k kept both tied tokens and the sampler picked one at random."""
    from hermes import zoo
    from hermes.serve import Service

    model = zoo.build(next(z for z in zoo.ZOO if z.name == "llama"))
    with torch.no_grad():
        w = model.lm_head.weight
        w[1::2] = w[0::2]
    path = tmp_path / "tied-pairs"
    model.save_pretrained(path)
    ref = reference_model(path)
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15, 16, 17, 18], [20, 21, 22]]
    want = [_solo(ref, p, 12) for p in prompts]
    assert all(t % 2 == 0 for w_ in want for t in w_)  # every greedy token was a tie, and generate took the first
    got = _served_greedy(Service(path, BUDGET, max_batch=4, max_queue=0), prompts, 12)
    assert got == want  # 48 ties: picked at random, all the first ones with a chance of 2**-48
