"""hermes serve under hostile input and faults: oversized and malformed bodies, browsers, memory, failed reads,
kills and restarts, SIGTERM with requests in flight (a real server on a free localhost port, tiny models)."""
from __future__ import annotations

import asyncio
import errno
import json
import os
import signal
import socket
import threading
import time
import urllib.parse
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import reference_model
from tests.test_serve import BUDGET, Server, _http, _solo, _with_tokenizer


@pytest.fixture(scope="module")
def chat_model(tiny_models, tmp_path_factory) -> Path:
    return _with_tokenizer(tiny_models["tiny-gpt2"], tmp_path_factory.mktemp("hardening") / "tiny-gpt2")


@pytest.fixture(scope="module")
def server(chat_model):
    s = Server(chat_model, "--max-batch", "3", "--max-queue", "4", "--request-memory", "96KiB", "--max-body",
               "64KiB")
    yield s
    assert s.stop() == 0


def _ok(server: Server) -> None:
    """The server still answers a normal request."""
    r = server.client().completions.create(model="tiny-gpt2", prompt=[1, 2], max_tokens=2)
    assert len(r.model_extra["hermes"]["token_ids"]) == 2


def _raw(server: Server, head: bytes, body: bytes = b"", timeout: float = 30) -> tuple[int, bytes]:
    """Send raw bytes; the status and body of the answer (the connection closed by the server or after it)."""
    url = urllib.parse.urlparse(server.url)
    with socket.create_connection((url.hostname, url.port), timeout=timeout) as sock:
        sock.sendall(head + body)
        data = b""
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _length(data):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    status = int(data.split(b" ", 2)[1])
    return status, data.split(b"\r\n\r\n", 1)[1]


def _length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":", 1)[1])
    return 1 << 30


def _post_head(path: str, length: int | None, **extra: str) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json", "Connection: close"]
    lines += [f"Content-Length: {length}"] if length is not None else ["Transfer-Encoding: chunked"]
    lines += [f"{k.replace('_', '-')}: {v}" for k, v in extra.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def test_a_10mb_body_gets_413_before_it_is_read_and_the_next_request_works(server):
    body = json.dumps({"prompt": "w1 " * 3_500_000, "max_tokens": 2}).encode()
    code, text = _http("POST", server.url + "/completions", body)
    err = json.loads(text)["error"]
    assert code == 413 and err["code"] == "request_too_large" and "--max-body" in err["message"], text
    # the same without Content-Length (chunked): refused once the bytes read pass the limit
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in (body[i:i + 65536] for i in range(0, 200_000, 65536)))
    chunks += b"0\r\n\r\n"
    code, answer = _raw(server, _post_head("/v1/completions", None), chunks)
    assert code == 413 and json.loads(answer)["error"]["code"] == "request_too_large"
    _ok(server)


def test_request_memory_is_counted_before_admission(server):
    """A body held by a request in flight counts: a second one that would pass the request memory gets 429;
    a request that could never fit gets 413; once the first ends, the next one is taken."""
    url = urllib.parse.urlparse(server.url)
    body = json.dumps({"prompt": [5, 6], "max_tokens": 2, "pad": "x" * 60_000}).encode()
    first = socket.create_connection((url.hostname, url.port), timeout=30)
    try:  # a slow client: its declared 60 KB are reserved while it sends them
        first.sendall(_post_head("/v1/completions", len(body)) + body[:1000])
        time.sleep(0.3)
        code, text = _http("POST", server.url + "/completions", body)
        err = json.loads(text)["error"]
        assert code == 429 and err["code"] == "request_memory_full" and "retry later" in err["message"], text
        first.sendall(body[1000:])
        assert b" 200 " in first.recv(65536).split(b"\r\n", 1)[0]
    finally:
        first.close()
    code, text = _http("POST", server.url + "/completions", body)
    assert code == 200, text
    assert server.metrics()["hermes_request_memory_held_bytes"] == 0


def test_text_that_cannot_fit_is_refused_before_it_is_tokenized(server, monkeypatch):
    """~60 KB of text for 128 positions: 400 context_length_exceeded, its tokens counted from a prefix."""
    text = "w1 " * 20_000
    code, answer = _http("POST", server.url + "/completions", json.dumps({"prompt": text}).encode())
    err = json.loads(answer)["error"]
    assert code == 400 and err["code"] == "context_length_exceeded" and "or more" in err["message"], answer
    _ok(server)


def test_many_large_requests_at_once_are_refused_and_memory_stays_bounded(server):
    """32 clients at once, each with a 60 KB prompt: every one gets an OpenAI-shaped 4xx (too long, or the request
    memory is full) and the server's peak RSS grows by less than 32 MiB."""
    pid = server.proc.pid
    with open(f"/proc/{pid}/clear_refs", "w") as f:  # reset the peak RSS (VmHWM) to the current RSS
        f.write("5")
    before = _status(pid)["VmHWM"]
    body = json.dumps({"prompt": "w2 " * 20_000, "max_tokens": 4}).encode()
    results: list[tuple[int, str]] = []

    def one() -> None:
        results.append(_http("POST", server.url + "/completions", body))

    threads = [threading.Thread(target=one) for _ in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(results) == 32
    for code, text in results:
        assert code in (400, 429), text
        assert json.loads(text)["error"]["code"] in ("context_length_exceeded", "request_memory_full")
    assert _status(pid)["VmHWM"] - before < 32 * 2**10, (before, _status(pid))  # kB
    _ok(server)


def _status(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if value.strip().endswith("kB"):
            out[key] = int(value.split()[0])
    return out


@pytest.mark.parametrize(("body", "param"), [
    ('{"prompt": "w1 \\ud800 w2"}', "prompt"),
    ('{"prompt": ["w1 \\udfff"]}', "prompt"),
    ('{"messages": [{"role": "user", "content": "\\ud800"}]}', "messages"),
    ('{"messages": [{"role": "user", "content": "w1", "name": "\\udc00"}]}', "messages"),
])
def test_invalid_unicode_is_a_400_naming_the_field(server, body, param):
    route = "/chat/completions" if "messages" in body else "/completions"
    code, text = _http("POST", server.url + route, body.encode())
    err = json.loads(text)["error"]
    assert code == 400 and err["param"] == param and err["code"] == "invalid_unicode", text
    assert "lone surrogate" in err["message"]


def test_a_surrogate_pair_is_text_and_invalid_utf8_is_refused(server):
    code, text = _http("POST", server.url + "/completions", b'{"prompt": "w1 \\ud83d\\ude00", "max_tokens": 2}')
    assert code == 200, text
    code, text = _http("POST", server.url + "/completions", b'{"prompt": "w1 \xff\xfe", "max_tokens": 2}')
    assert code == 400 and json.loads(text)["error"]["type"] == "invalid_request_error", text
    deep = b'{"prompt": ' + b"[" * 20_000 + b"]" * 20_000 + b"}"
    code, text = _http("POST", server.url + "/completions", deep)
    assert code == 400 and json.loads(text)["error"], text


def test_web_pages_cannot_drive_the_server(server):
    """DNS rebinding (a foreign Host) and cross-origin requests (a foreign Origin) are refused; loopback pages
    and clients without an Origin (curl, SDKs) are served."""
    body = b'{"prompt": [1, 2], "max_tokens": 1}'
    code, text = _http("POST", server.url + "/completions", body, host="evil.example:8000")
    assert code == 403 and json.loads(text)["error"]["code"] == "host_not_allowed", text
    code, text = _http("POST", server.url + "/completions", body, origin="https://evil.example")
    assert code == 403 and json.loads(text)["error"]["code"] == "origin_not_allowed", text
    assert _http("GET", server.url + "/models", origin="null")[0] == 403
    assert _http("POST", server.url + "/completions", body, origin="http://localhost:3000")[0] == 200
    assert _http("POST", server.url + "/completions", body, host="localhost:1234")[0] == 200


JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False)
                    | st.text(max_size=20), lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=12), inner, max_size=4), max_leaves=12)
FIELDS = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
          "n", "stream", "stop", "logprobs"]


def _bodies() -> st.SearchStrategy[bytes]:
    valid = st.fixed_dictionaries({"model": st.just("tiny-gpt2"), "prompt": st.just([5, 6]),
                                   "messages": st.just([{"role": "user", "content": "w1 w2"}]),
                                   "max_tokens": st.integers(1, 3)})
    mutated = st.tuples(valid, st.dictionaries(st.sampled_from(FIELDS), JSON, max_size=3)).map(
        lambda t: json.dumps({**t[0], **t[1]}).encode())
    return mutated | JSON.map(lambda v: json.dumps(v).encode()) | st.binary(max_size=64)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(route=st.sampled_from(["/completions", "/chat/completions"]), body=_bodies())
def test_fuzzed_bodies_get_2xx_or_4xx_json_and_the_server_goes_on(server, route, body):
    code, text = _http("POST", server.url + route, body)
    assert 200 <= code < 500, (code, text, body)
    if code >= 400:
        err = json.loads(text)["error"]
        assert err["message"] and err["type"], text
    elif text.startswith("data: "):
        assert text.rstrip().endswith("data: [DONE]"), text
    else:
        assert json.loads(text)["choices"], text


def test_fuzzing_left_the_server_serving(server):
    assert json.loads(_http("GET", server.url.removesuffix("/v1") + "/health")[1])["status"] == "ok"
    _ok(server)


# ---- faults ---------------------------------------------------------------------------------------------------

def test_sigterm_with_requests_in_flight_lets_them_finish_and_exits_0(chat_model):
    s = Server(chat_model, "--max-batch", "4")
    try:
        outcomes = _in_flight(s, 4)
        time.sleep(0.2)
        s.proc.send_signal(signal.SIGTERM)
        health = _http("GET", s.url.removesuffix("/v1") + "/health")
        refused = _http("POST", s.url + "/completions", b'{"prompt": [1], "max_tokens": 1}')
        code = s.proc.wait(timeout=60)
    finally:
        s.stop()
    log = "".join(s.log)
    assert code == 0 and "stopped" in log and "Traceback" not in log, log
    assert health[0] == 503 and json.loads(health[1])["status"] == "draining"
    assert refused[0] == 503 and json.loads(refused[1])["error"]["code"] == "shutting_down"
    for stream, (status, text) in outcomes():
        assert status == 200, text
        assert (text.rstrip().endswith("data: [DONE]") if stream else json.loads(text)["choices"][0]["text"])


@pytest.mark.parametrize(("drain", "signals"), [("0", 1), ("60", 2)])
def test_sigterm_past_the_drain_timeout_ends_requests_with_errors_not_tracebacks(chat_model, drain, signals):
    """Past --drain-timeout, or at a second signal, the requests in flight end with an error event / a JSON 503."""
    s = Server(chat_model, "--max-batch", "2", "--drain-timeout", drain)
    try:
        outcomes = _in_flight(s, 4, max_tokens=120)
        time.sleep(0.2)
        for _ in range(signals):
            s.proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
        code = s.proc.wait(timeout=60)
    finally:
        s.stop()
    log = "".join(s.log)
    assert code == 0 and "Traceback" not in log, log
    ended = 0
    for stream, (status, text) in outcomes():
        if stream:  # an error event, then [DONE] (or it had finished)
            assert status == 200 and text.rstrip().endswith("data: [DONE]"), text
            ended += '"shutting_down"' in text
        else:
            assert status in (200, 503), text
            assert json.loads(text)["choices" if status == 200 else "error"], text
            ended += status == 503
    assert ended >= 1  # 4 x 123 positions take turns in a KV cache of 144: they were not all done


def _in_flight(s: Server, n: int, max_tokens: int = 60):
    """``n`` requests (streamed and not, alternately) running in threads; a function waiting for their answers."""
    results: dict[int, tuple[int, str]] = {}

    def one(i: int) -> None:
        body = {"prompt": [5, 6, 7], "max_tokens": max_tokens, "temperature": 0, "stream": i % 2 == 0}
        try:
            results[i] = _http("POST", s.url + "/completions", json.dumps(body).encode())
        except OSError as exc:
            results[i] = (0, repr(exc))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    s.wait_metrics(lambda m: m["hermes_requests_running"] + m["hermes_requests_waiting"] >= n, timeout=30)

    def outcomes() -> list[tuple[bool, tuple[int, str]]]:
        for t in threads:
            t.join(60)
        return [(i % 2 == 0, results[i]) for i in range(n)]

    return outcomes


def test_a_weights_file_truncated_while_serving_fails_the_request_and_exits_non_zero(chat_model, tmp_path):
    import shutil

    model = tmp_path / "tiny-gpt2"
    shutil.copytree(chat_model, model)
    s = Server(model)
    try:
        _ok(s)
        weights = model / "model.safetensors"
        with open(weights, "r+b") as f:
            f.truncate(os.path.getsize(weights) // 3)
        code, text = _http("POST", s.url + "/completions", b'{"prompt": [5, 6, 7], "max_tokens": 4}')
        assert code == 500 and json.loads(text)["error"]["type"] == "server_error", text
        try:  # until it exits, /health says why nothing is served
            status, answer = _http("GET", s.url.removesuffix("/v1") + "/health")
            assert status == 503 and "broken" in json.loads(answer)["status"] or "recovering" in answer, answer
        except OSError:
            pass  # it already exited
        assert s.proc.wait(timeout=60) == 1
    finally:
        s.stop()
    log = "".join(s.log)
    assert "shorter than its tensors" in log and "restore it" in log, log


def test_kill_then_immediate_restart_on_the_same_port(chat_model):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    s = Server(chat_model, port=port)
    _ok(s)
    assert s.stop(signal.SIGKILL) == -signal.SIGKILL
    again = Server(chat_model, port=port)  # at once: the port is not blocked by the last connections
    try:
        assert again.url.endswith(f":{port}/v1")
        _ok(again)
    finally:
        assert again.stop() == 0


def test_a_failed_read_fails_its_requests_then_the_service_recovers_exactly(chat_model, monkeypatch):
    """A read that fails once (EIO) while the files are intact: the requests of that step get the error, the
    generation loop restarts, and the next requests are token-exact."""
    from hermes.engine.reader import Reader
    from hermes.serve import Sampling, Service

    service = Service(chat_model, BUDGET, max_batch=2, max_queue=2)
    ref = reference_model(chat_model)
    read = Reader.read
    failures = [1]

    def flaky(self, unit, buf):
        if failures[0]:
            failures[0] -= 1
            raise OSError(errno.EIO, "injected read error")
        return read(self, unit, buf)

    service.start()
    try:
        async def one(ids: list[int]):
            q: asyncio.Queue = asyncio.Queue()
            service.submit(ids, 6, Sampling(temperature=0), q.put_nowait)
            while not (out := await q.get()).is_finished():
                pass
            return out

        async def run():
            monkeypatch.setattr(Reader, "read", flaky)
            failed = await one([5, 6, 7])
            deadline = time.monotonic() + 60
            while service.status() != "ok" and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            return failed, service.status(), await one([5, 6, 7]), await one([9, 10])

        failed, status, first, second = asyncio.run(run())
    finally:
        service.stop()
    assert failed.error and "injected read error" in str(failed.error)
    assert status == "ok"
    assert first.generated_tokens == _solo(ref, [5, 6, 7], 6) and not first.error
    assert second.generated_tokens == _solo(ref, [9, 10], 6)
