"""Several devices, one model (hermes.ring): processes on this machine joined by torch.distributed (gloo over
loopback), each streaming its share of a model written by ``save_pretrained`` under its own budget. Forward
bit-exact and greedy generate token-exact against transformers; each stage's weights within its budget; a killed
stage, a world that never assembles, another checkpoint, a budget too small: every process ends with a clear error
in bounded time."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hermes import zoo
from hermes.engine import minimum_budget
from hermes.ring import RingError, RingSpec, assign, laps_of
from hermes.ring.measure import DeviceFacts
from hermes.share import RUNTIME_SLACK_BYTES

WORKER = Path(__file__).parent / "ring_worker.py"
IDS = [5, 6, 7, 8, 9, 10, 11]
NEW = 6
DEADLINE_S = 120  # a ring test that has not ended by then fails (its processes are killed)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def streaming_budget(path: Path) -> int:
    """A budget whose weight share is about the whole model's minimum weight budget: every stage streams."""
    from hermes.api import forward_activation_bytes, open_model
    from hermes.generation import activation_bytes, kv_cache_bytes

    layout = open_model(path)
    total = len(IDS) + NEW
    gen = kv_cache_bytes(layout.config, 1, total, layout.model.dtype, model_class=type(layout.model).__bases__[-1]) \
        + activation_bytes(layout.config, 1, len(IDS), layout.model.dtype)
    return minimum_budget(layout.units) + max(gen, forward_activation_bytes(layout, 1, len(IDS))) + \
        RUNTIME_SLACK_BYTES + 64 * 1024


def launch(path: Path, out: Path, world: int, budgets: list[str], *extra: str,
           paths: list[Path] | None = None) -> list[subprocess.Popen]:
    address = f"127.0.0.1:{free_port()}"
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    return [subprocess.Popen([sys.executable, str(WORKER), str((paths or [path] * world)[r]), "--address", address,
                              "--rank", str(r), "--world-size", str(world), "--budget", budgets[r], "--out", str(out),
                              *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            for r in range(world)]


def finish(procs: list[subprocess.Popen], timeout: float = DEADLINE_S) -> list[tuple[int, str]]:
    """(exit status, stderr) of each process, all of them ended within ``timeout`` (else killed and failed)."""
    deadline = time.monotonic() + timeout
    results = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"a ring process did not end within {timeout} s")
        results.append((p.returncode, err))
    return results


def reference(z: zoo.ZooModel, path: Path) -> tuple[dict[str, torch.Tensor], list[int]]:
    import transformers

    model = getattr(transformers, z.model_class).from_pretrained(path).eval()  # its defaults (experts: grouped_mm)
    x = torch.tensor([IDS])
    with torch.no_grad():
        fwd = model(input_ids=x)
        gen = model.generate(x, max_new_tokens=NEW, do_sample=False)
    return {"logits": fwd.logits}, gen[0, len(IDS):].tolist()


@pytest.mark.parametrize(("name", "world", "stages", "laps"), [("llama", 2, None, 1), ("gpt2", 3, None, 1),
                                                               ("qwen2-moe", 2, "1,2", 1),
                                                               # devices left out: rank 0 only takes the request,
                                                               # rank 1 computes from the embedding to the head
                                                               ("llama", 3, "0,3,0", 1),
                                                               # three laps: each device computes three parts
                                                               ("llama-6", 2, "3,3", 3)])
def test_a_ring_computes_what_transformers_computes(tmp_path, name, world, stages, laps):
    from safetensors.torch import load_file

    z = zoo.BY_NAME[name.removesuffix("-6")]
    if name.endswith("-6"):
        z = dataclasses.replace(z, config={**z.config, "num_hidden_layers": 6})
    path = zoo.save(z, tmp_path / name)
    budget = str(streaming_budget(path))
    procs = launch(path, tmp_path / "out", world, [budget] * world, *(["--stages", stages] if stages else []),
                   "--laps", str(laps))
    ends = finish(procs)
    assert all(rc == 0 for rc, _ in ends), [err[-2000:] for _, err in ends]
    want_fwd, want_tokens = reference(z, path)
    got = load_file(tmp_path / "out" / "forward.safetensors")
    assert torch.equal(got["logits"], want_fwd["logits"])  # bit-exact
    res = json.loads((tmp_path / "out" / "rank0.json").read_text())
    assert res["generate"]["tokens"] == [want_tokens]
    reports = res["generate"]["ring"]
    assert [r["rank"] for r in reports] == list(range(world))
    parts = sorted((a, b, r["rank"]) for r in reports for a, b in r["parts"])
    covered = [i for a, b, _ in parts for i in range(a, b)]
    assert covered == list(range(len(covered)))  # every block once
    if laps == 1:  # contiguous, in rank order
        assert [b for r in reports for b in range(*r["blocks"])] == covered
    else:  # the ranks in turn, lap after lap: each rank's parts
        assert [rank for _, _, rank in parts] == list(range(world)) * laps
    assert stages or all(r["blocks"][1] > r["blocks"][0] for r in reports)  # by budget: each rank some blocks
    for r in reports:  # a device computes its blocks with its threads (2 here), the others' blocks with one
        threads = json.loads((tmp_path / "out" / f"rank{r['rank']}.json").read_text())["threads"]
        mine = sum(b - a for a, b in r["parts"])
        assert threads == {"own": [2] if mine else [], "remote": [1] if mine < len(covered) else [], "after": 2}, r
    if stages:
        assert [sum(b - a for a, b in r["parts"]) for r in reports] == [int(s) for s in stages.split(",")]
    # a left-padded batch of two prompts, sampled with a seed: the tokens hermes gives on one device (whose sampling
    # equals transformers', tests/test_generation.py)
    from hermes.runner import run_generation

    one = run_generation(path, budget=2**30, ids=[IDS, IDS[:4]], max_new_tokens=NEW, do_sample=True, top_k=50,
                         seed=3)
    assert res["sampled"]["tokens"] == one["tokens"]
    for call in ("forward", "generate", "sampled"):
        for r in res[call]["ring"]:
            computes = r["blocks"][1] > r["blocks"][0]  # a device left out holds no weights
            assert computes <= r["weights_peak_bytes"] <= r["weight_budget_bytes"], (call, r)
    # generate sends the chosen token, not the logits: the device of the head sends 8 bytes per device per token
    tail = max(reports, key=lambda r: r["blocks"][1])
    hidden = 4 * z.config.get("hidden_size", 0) * (laps - 1)  # with laps the tail also sends hidden states per lap
    assert tail["sent_bytes_per_token"] <= 8 * world + 2 * hidden < z.config["vocab_size"] * 4, tail
    # each stage streams its own share: some rank reads weights again for every token
    assert any(r["bytes_read_per_token"] > 0 for r in reports)
    # the other devices' blocks are not run on the meta device every token: once a block's run is trusted (the first
    # new token's, or the second's where a length meets a dimension), its cache calls and output shapes are replayed
    for call in ("generate", "sampled"):
        for r in res[call]["ring"]:
            runs = r["meta_runs"]
            if sum(runs.values()):
                assert runs["replayed"] >= runs["ran"], (call, r["rank"], runs)
    # times by the tokens' arrival on rank 0 (its own pass ends before the others have computed the token)
    gen = res["generate"]
    assert 0 < gen["ttft_s"] < gen["total_s"] and gen["decode_tokens_per_s"] > 0
    assert all(r["cpu_s_per_token"] > 0 for r in gen["ring"])  # each device's CPU a decoded token


def test_a_killed_stage_ends_every_other_process_with_a_clear_error(tmp_path):
    z = zoo.BY_NAME["llama"]
    path = zoo.save(z, tmp_path / "llama")
    budget = str(streaming_budget(path))
    procs = launch(path, tmp_path / "out", 3, [budget] * 3, "--slow", "--generate-only", "--new-tokens", "40")
    victim = procs[1]
    assert victim.stdout is not None
    assert victim.stdout.readline().strip() == "reading"  # mid-token: rank 1 is reading its units
    victim.send_signal(signal.SIGKILL)
    t0 = time.monotonic()
    ends = finish([procs[0], procs[2]], timeout=60)
    assert time.monotonic() - t0 < 30
    for rc, err in ends:
        assert rc == 2, err[-2000:]
        assert "the ring broke" in err and "start them all again" in err, err[-2000:]
    victim.wait()


def test_a_world_that_never_assembles_ends_in_bounded_time(tmp_path):
    from hermes.ring import Ring

    spec = RingSpec(f"127.0.0.1:{free_port()}", 0, 2, timeout_s=2.0)
    t0 = time.monotonic()
    with pytest.raises(RingError, match="could not join the ring of 2"):
        Ring(spec).join()
    assert time.monotonic() - t0 < 30


def test_another_checkpoint_or_a_budget_too_small_stops_every_rank_with_the_reason(tmp_path):
    z = zoo.BY_NAME["llama"]
    a, b = zoo.save(z, tmp_path / "a"), zoo.save(z, tmp_path / "b", seed=1)
    budget = str(streaming_budget(a))
    ends = finish(launch(a, tmp_path / "out1", 2, [budget] * 2, "--generate-only", paths=[a, b]))
    for rc, err in ends:
        assert rc == 2 and "opened another checkpoint than rank 0" in err, err[-2000:]
    # rank 1 given blocks by hand: its budget cannot hold them
    ends = finish(launch(a, tmp_path / "out2", 2, [budget, "40KiB"], "--generate-only", "--stages", "1,2"))
    for rc, err in ends:
        assert rc == 2 and "rank 1 could not hold this generation in its budget" in err, err[-2000:]
        assert "below the minimum" in err, err[-2000:]


def test_blocks_are_shared_by_budget_or_by_hand(tmp_path):
    from hermes.api import open_model
    from hermes.engine.kinds.remote import execution_order

    path = zoo.save(zoo.BY_NAME["opt"], tmp_path / "opt")  # OPT registers its final norm before its layers
    layout = open_model(path)
    order = execution_order(layout.model, layout.units, {"input_ids": torch.tensor([[5, 6]])})
    names = sorted(order, key=order.get)
    assert layout.units[names[-1]].name == "lm_head" or layout.units[names[-1]].kind == "chunk"
    blocks = [u for u in layout.units if u.kind == "block"]
    n = len(blocks)
    by_budget = lambda *b: [DeviceFacts(x) for x in b]  # noqa: E731 - no speeds measured: shared by budget
    assert assign(layout.units, order, by_budget(1, 1)) in ([(0, n // 2), (n // 2, n)],
                                                          [(0, (n + 1) // 2), ((n + 1) // 2, n)])
    assert assign(layout.units, order, by_budget(1, 10**6))[0] == (0, 1)  # the small device gets one block
    assert assign(layout.units, order, by_budget(1, 1), (1, n - 1)) == [(0, 1), (1, n)]
    assert assign(layout.units, order, by_budget(1, 1), (0, n)) == [(0, 0), (0, n)]  # by hand, rank 0 left out
    with pytest.raises(RingError, match="must add up to"):
        assign(layout.units, order, by_budget(1, 1), (1, 1))
    with pytest.raises(RingError, match="must add up to"):
        assign(layout.units, order, by_budget(1, 1), (0, 0))
    # more devices than blocks: one block each, one device none
    more = assign(layout.units, order, by_budget(*[1] * (n + 1)))
    assert sorted(b - a for a, b in more) == [0] + [1] * n and [a for a, _ in more] == sorted(a for a, _ in more)


def test_blocks_are_shared_by_measured_speed():
    from hermes.units import Unit

    def block(i: int) -> Unit:
        return Unit(i, f"layers.{i}", "block", (), (), nbytes=100, buffer_bytes=100)

    units = [block(i) for i in range(12)]
    order = {u.index: u.index for u in units}
    big = 10**6  # every share fits: the time is compute alone
    even = assign(units, order, [DeviceFacts(big, 1e3, 1e3), DeviceFacts(big, 1e3, 1e3)])
    assert even == [(0, 6), (6, 12)]  # equal sums everywhere: the slowest rank decides
    # equal devices measured a little apart (noise): no lopsided split for a predicted gain under 10 %
    assert assign(units, order, [DeviceFacts(big, 1.05e3, 1e3), DeviceFacts(big, 1e3, 1e3)]) == even
    # a device 3x faster that holds the whole model: the other one would only add its time to every token (a
    # one-sequence pipeline runs its devices one after the other) — it is left out
    assert assign(units, order, [DeviceFacts(big, 3e3, 1e3), DeviceFacts(big, 1e3, 1e3)]) == [(0, 12), (12, 12)]
    # ... unless it is needed for memory: rank 0 holds half the model, its disk is slow
    assert assign(units, order, [DeviceFacts(600, 3e3, 10.0), DeviceFacts(big, 1e3, 1e3)]) == [(0, 6), (6, 12)]
    # a slow middle device of three is left out; the ring runs rank 0 -> rank 2
    three = assign(units, order, [DeviceFacts(600, 1e3, 1.0), DeviceFacts(big, 1e2, 1.0), DeviceFacts(600, 1e3, 1.0)])
    assert three == [(0, 6), (6, 6), (6, 12)]
    # rank 1 holds 300 bytes and reads from a slow disk: rank 0 takes all it holds and computes fast enough
    ranges = assign(units, order, [DeviceFacts(900, 1e3, 1e3), DeviceFacts(300, 1e3, 10.0)])
    assert ranges == [(0, 9), (9, 12)]


def test_laps_cut_each_share_into_parts_in_turn():
    from hermes.ring.split import auto_laps
    from hermes.units import Unit

    assert laps_of([(0, 6), (6, 12)], 1) == [(0, 0, 6), (1, 6, 12)]
    assert laps_of([(0, 6), (6, 12)], 3) == [(0, 0, 2), (1, 2, 4), (0, 4, 6), (1, 6, 8), (0, 8, 10), (1, 10, 12)]
    # fewer blocks than laps: the first rank's come first, the last rank's last (the embedding and the head keep
    # their ranks); a rank with no part in a lap is skipped, the same rank's parts then join
    assert laps_of([(0, 5), (5, 6)], 3) == [(0, 0, 5), (1, 5, 6)]
    assert laps_of([(0, 1), (1, 4), (4, 6)], 2) == [(0, 0, 1), (1, 1, 3), (2, 3, 4), (1, 4, 5), (2, 5, 6)]
    assert laps_of([(0, 0), (0, 4)], 2) == [(1, 0, 4)]  # a rank left out stays out
    units = [Unit(i, f"layers.{i}", "block", (), (), nbytes=100, buffer_bytes=100) for i in range(12)]
    order = {u.index: u.index for u in units}
    assert auto_laps(units, order, [(0, 6), (6, 12)], [600, 600]) == 1  # every share fits its budget
    assert auto_laps(units, order, [(0, 6), (6, 12)], [250, 600]) == 3  # rank 0's 600 bytes in parts of 200
    assert auto_laps(units, order, [(0, 6), (6, 12)], [10, 600]) == 6  # at most one block a part


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"address": "nohost", "rank": 0, "world_size": 2}, "is not HOST:PORT"),
    ({"address": "h:1", "rank": 0, "world_size": 2, "laps": 0}, "a token passes the ring at least once"),
    ({"address": "h:1", "rank": 2, "world_size": 2}, "is not in 0..1"),
    ({"address": "h:1", "rank": 0, "world_size": 2, "stages": (1,)}, "one count per rank"),
])
def test_bad_ring_settings_are_clear_errors(kwargs, message):
    with pytest.raises(RingError, match=message):
        RingSpec(**kwargs)


def test_cli_ring_flags_need_each_other(tiny_models, capsys):
    from hermes.cli import main

    assert main(["generate", str(tiny_models["tiny-gpt2"]), "--budget", "10MiB", "--rank", "1"]) == 2
    assert "without --ring" in capsys.readouterr().err
    assert main(["generate", str(tiny_models["tiny-gpt2"]), "--budget", "10MiB", "--rank", "0"]) == 2  # 0 counts
    assert "without --ring" in capsys.readouterr().err
    assert main(["run", str(tiny_models["tiny-gpt2"]), "--budget", "10MiB", "--ring", "127.0.0.1:1"]) == 2
    assert "needs --rank" in capsys.readouterr().err


def test_torchrun_s_environment_is_a_ring(tiny_models, capsys, monkeypatch):
    """Under torchrun (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set) no ring flag is needed: here a ring of one
    device, in this process, end to end through the CLI."""
    from hermes.cli import main

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    spec = RingSpec.from_environment(30.0)
    assert spec is not None and (spec.address, spec.rank, spec.world_size) == (None, 0, 1)
    assert main(["generate", str(tiny_models["tiny-gpt2"]), "--budget", "64MiB", "--prompt-ids", "5,6,7",
                 "--max-new-tokens", "4", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["world_size"] == 1 and len(res["tokens"][0]) == 4 and res["ring"][0]["blocks"][0] == 0
    from hermes.runner import run_generation

    assert res["tokens"] == run_generation(tiny_models["tiny-gpt2"], budget="64MiB", ids=[[5, 6, 7]],
                                           max_new_tokens=4)["tokens"]  # the same tokens as without a ring
    import torch.distributed as dist

    assert not dist.is_initialized()  # the command left the ring


def test_a_ring_generation_is_timed_by_its_tokens_arrival():
    from hermes.ring.driver import _token_clock

    stats = {"new_tokens": 4, "ttft_s": 0.5, "decode_tokens_per_s": 100.0, "tokens_per_s": 9.0, "total_s": 1.0}
    _token_clock(stats, [10.0, 12.0, 13.0, 14.0], start=8.0, end=14.5)  # by the passes: 0.5 s to the first
    assert stats == {"new_tokens": 4, "ttft_s": 2.0, "decode_tokens_per_s": 0.75, "tokens_per_s": 4 / 6.5,
                     "total_s": 6.5}
    _token_clock(stats, [], start=0.0, end=1.0)  # no token relayed (a forward): the passes' figures stay
    assert stats["ttft_s"] == 2.0
    # with the process's CPU time at each arrival: its CPU seconds per decoded token
    _token_clock(stats, [10.0, 12.0, 13.0, 14.0], start=8.0, end=14.5, cpu=[3.0, 3.5, 4.25, 4.5])
    assert stats["cpu_s_per_token"] == 0.5


def test_an_encoder_decoder_on_a_ring_is_refused_clearly(tmp_path, capsys):
    """generate calls an encoder-decoder's encoder on its own, which a ring does not split: a clear error (exit 2)
    on every device, and the ring left."""
    import torch.distributed as dist

    from hermes.cli import main

    path = zoo.save(zoo.BY_NAME["t5"], tmp_path / "t5")
    assert main(["generate", str(path), "--budget", "64MiB", "--prompt-ids", "5,6,7", "--max-new-tokens", "2",
                 "--ring", f"127.0.0.1:{free_port()}", "--rank", "0", "--world-size", "1"]) == 2
    err = capsys.readouterr().err
    assert "is an encoder-decoder" in err and "run this one on one device" in err and "Traceback" not in err
    assert not dist.is_initialized()
