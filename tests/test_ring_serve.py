"""hermes serve on a ring (hermes.ring.serving): rank 0's OpenAI server, every device computing its share of each
continuous-batching step in lockstep. Processes on 127.0.0.1; concurrent requests equal transformers' greedy
generate; a killed device stops the server with a clear error in bounded time; stopping rank 0 stops every device
cleanly."""
from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import reference_model
from tests.test_ring import free_port
from tests.test_serve import BUDGET, Server, _http, _solo, _with_tokenizer

DEADLINE_S = 30  # a device that lost its ring exits within this


def followers(model: Path, address: str, world: int) -> list[subprocess.Popen]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return [subprocess.Popen([sys.executable, "-m", "hermes.cli", "serve", str(model), "--budget", BUDGET,
                              "--ring", address, "--rank", str(r), "--world-size", str(world), "--ring-timeout", "60"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            for r in range(1, world)]


def ring_server(model: Path, world: int) -> tuple[Server, list[subprocess.Popen]]:
    address = f"127.0.0.1:{free_port()}"
    rest = followers(model, address, world)
    try:
        server = Server(model, "--ring", address, "--rank", "0", "--world-size", str(world), "--ring-timeout", "60",
                        "--max-batch", "3", "--model-name", "m")
    except BaseException:
        for p in rest:
            p.kill()
        raise
    return server, rest


def ended(proc: subprocess.Popen, timeout: float) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise AssertionError(f"a device did not exit within {timeout} s") from None
    return proc.returncode, err


def complete(url: str, ids: list[int], n: int, **extra: object) -> dict:
    status, body = _http("POST", url + "/completions", json.dumps({"model": "m", "prompt": ids, "max_tokens": n,
                                                                   "temperature": 0, **extra}).encode())
    assert status == 200, body
    return json.loads(body)


@pytest.fixture(scope="module")
def chat_model(tiny_models, tmp_path_factory) -> Path:
    return _with_tokenizer(tiny_models["tiny-gpt2"], tmp_path_factory.mktemp("ring-serve") / "tiny-gpt2")


def test_three_devices_serve_concurrent_requests_exactly_and_a_killed_device_stops_the_server(chat_model):
    reference = reference_model(chat_model)
    server, rest = ring_server(chat_model, 3)
    try:
        prompts = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16, 17]]
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            got = list(pool.map(lambda p: complete(server.url, p, 6)["hermes"]["token_ids"], prompts))
        assert got == [_solo(reference, p, 6) for p in prompts]
        # text in, text out, through the openai client; sampled requests keep every device in step (the greedy
        # request after them still equals transformers)
        client = server.client()
        r = client.completions.create(model="m", prompt="w1 w2 w3", max_tokens=5, temperature=0)
        assert r.choices[0].text and r.usage.completion_tokens == 5
        for seed_prompt in ([3, 4, 5], [6, 7]):
            s = complete(server.url, seed_prompt, 8, temperature=0.9, top_p=0.9)
            assert len(s["hermes"]["token_ids"]) >= 1
        assert complete(server.url, prompts[0], 6)["hermes"]["token_ids"] == got[0]
        metrics = server.metrics()
        assert metrics["hermes_requests_completed_total"] >= 7, metrics
        # a device dies: the server and the other device end with the reason, in bounded time
        rest[0].send_signal(signal.SIGKILL)
        t0 = time.monotonic()
        code, _ = ended(server.proc, DEADLINE_S)
        assert code != 0
        assert "the ring" in "".join(server.log) and "Traceback" not in "".join(server.log)
        code2, err2 = ended(rest[1], DEADLINE_S)
        assert code2 == 2 and "the ring broke" in err2, err2
        assert time.monotonic() - t0 < DEADLINE_S
    finally:
        for p in (server.proc, *rest):
            if p.poll() is None:
                p.kill()


def test_stopping_rank_0_stops_every_device_cleanly(tiny_models, tmp_path):
    model = tiny_models["tiny-llama"]
    reference = reference_model(model)
    server, rest = ring_server(model, 2)
    try:
        ids = [5, 6, 7, 8, 9, 10, 11]
        assert complete(server.url, ids, 6)["hermes"]["token_ids"] == _solo(reference, ids, 6)
        assert _http("GET", server.url.removesuffix("/v1") + "/health")[0] == 200
        assert server.stop(signal.SIGTERM) == 0
        code, err = ended(rest[0], DEADLINE_S)
        assert code == 0 and "stopped" in err, err
    finally:
        for p in (server.proc, *rest):
            if p.poll() is None:
                p.kill()
