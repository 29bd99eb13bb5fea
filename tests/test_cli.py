"""The CLI: run / synth / bench print what they promise, and bad input exits non-zero with a clear message."""
from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from hermes.cli import build_parser, main
from hermes.errors import BudgetError
from hermes.memory import format_bytes, parse_bytes

from .conftest import overlapping_reads, reference_model


def test_run_json_has_the_documented_fields(tiny_models, tmp_path, capsys):
    out = tmp_path / "out.safetensors"
    code = main(["run", str(tiny_models["tiny-gpt2"]), "--budget", "1MiB", "--loaders", "2",
                 "--input-ids", "1,2,3,4,5", "--save-output", str(out), "--json", "--timeline"])
    assert code == 0
    res = json.loads(capsys.readouterr().out)
    for key in ("latency_s", "stall_s", "loaders", "budget_bytes", "weights_peak_bytes", "baseline_rss_bytes",
                "peak_rss_bytes", "output_path", "events", "memory"):
        assert key in res
    # the budget holds the weights, this input's activations and what is left of the runtime slack
    assert res["process_budget_bytes"] == 2**20 == res["budget_bytes"] + res["activation_reserved_bytes"] \
        + res["slack_bytes"]
    assert 0 < res["weights_peak_bytes"] <= res["budget_bytes"]
    assert res["loaders"] == 2 and res["output_path"] == str(out)
    assert [e["name"] for e in res["events"]][:2] == ["transformer.wte", "transformer.wpe"]
    with torch.no_grad():
        want = reference_model(tiny_models["tiny-gpt2"])(input_ids=torch.tensor([[1, 2, 3, 4, 5]])).logits
    torch.testing.assert_close(load_file(out)["logits"], want, rtol=0, atol=0)
    assert not list(tmp_path.glob(".*.tmp"))


def test_run_text_with_real_tokenizer(minilm, capsys):
    assert main(["run", str(minilm), "--budget", "60MiB", "--text", "edge devices", "--io", "direct"]) == 0
    printed = capsys.readouterr().out
    assert "latency" in printed and "weights peak" in printed
    assert re.search(r"budget  budget 60\.0 MiB = weights \S+ MiB \+ activations \S+ [KM]iB \+ runtime slack 32\.0 MiB",
                     printed)


def test_run_sequential_with_prefetch_0(tiny_models, capsys):
    assert main(["run", str(tiny_models["tiny-gpt2"]), "--budget", "1MiB", "--prefetch", "0", "--random-input", "8",
                 "--json", "--timeline"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["prefetch"] == 0
    stats = SimpleNamespace(events=[SimpleNamespace(**e) for e in res["events"]])
    assert any(e.agent is not None for e in stats.events) and overlapping_reads(stats) == []


def test_run_image_model_with_random_input(tiny_models, capsys):
    assert main(["run", str(tiny_models["tiny-vit"]), "--budget", "1MiB", "--random-input", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["input_shape"] == {"pixel_values": [1, 3, 32, 32]}


@pytest.mark.parametrize(("args", "message"), [
    (["--budget", "12 potatoes"], "cannot parse budget '12 potatoes'"),
    (["--budget=-5MiB"], "budget must be positive"),
    (["--budget", "0"], "budget must be positive"),
    (["--budget", "10KiB"], "below the minimum"),
    (["--budget", "1MiB", "--text", "hi"], "this checkpoint has no tokenizer"),
    (["--budget", "1MiB", "--input-ids", "5,999999"], "token ids must lie in [0, 999]"),
    (["--budget", "1MiB", "--random-input", "500"], "takes at most 128"),
    (["--budget", "1MiB", "--image", "x.png"], "takes text, not an image alone"),
])
def test_bad_input_exits_2_with_a_clear_message(untokenized, capsys, args, message):
    assert _exit_code(["run", str(untokenized["tiny-bert"]), *args]) == 2  # budgets are refused by argparse
    err = capsys.readouterr().err
    assert "error:" in err and message in err and "Traceback" not in err


def test_synth_cli(tmp_path, capsys):
    assert main(["synth", "tiny-gptj", str(tmp_path / "gj"), "--dtype", "float16", "--seed", "7"]) == 0
    assert (tmp_path / "gj" / "model.safetensors").is_file()
    assert json.loads((tmp_path / "gj" / "config.json").read_text())["dtype"] == "float16"


def test_bench_cli_writes_json_and_markdown(tiny_models, tmp_path, capsys):
    out = tmp_path / "res"
    code = main(["bench", str(tiny_models["tiny-bert"]), "--budget", "2MiB", "--repeat", "1", "--no-bounds",
                 "--strategies", "full,pipeload:loaders=1;io=direct", "-o", str(out)])
    assert code == 0
    res = json.loads((out / "results.json").read_text())
    assert res["format_version"] == 1 and len(res["runs"]) == 2
    assert all("error" not in r for r in res["runs"]), res["runs"]
    summary = res["summary"]
    assert summary["pipeload:loaders=1,io=direct"]["weights_peak_bytes"] <= 2**21
    assert summary["pipeload:loaders=1,io=direct"]["same_output"] is True  # checked against full's
    assert "| full |" in (out / "results.md").read_text()


def test_bench_exits_1_when_no_strategy_completes(tiny_models, tmp_path, capsys):
    out = tmp_path / "res"
    code = main(["bench", str(tiny_models["tiny-bert"]), "--budget", "1MiB", "--repeat", "1", "--no-bounds",
                 "--strategies", "sequential:budget=1KB", "-o", str(out)])
    assert code == 1
    captured = capsys.readouterr()
    assert "cannot run" in captured.out and "no strategy completed a run" in captured.err
    assert json.loads((out / "results.json").read_text())["summary"]["sequential:budget=1KB"]["error"]


def test_parse_bytes():
    assert parse_bytes("300MiB") == 300 * 2**20
    assert parse_bytes("1.5GB") == 1_500_000_000
    assert parse_bytes("4096") == 4096 and parse_bytes(4096) == 4096
    for bad in ("", "MiB", "3 XB", "nan", True):
        with pytest.raises(BudgetError):
            parse_bytes(bad)
    assert format_bytes(3 * 2**20) == "3.0 MiB"


def test_run_reports_weight_memory_above_the_baseline(tiny_models, capsys):
    """The baseline is taken before the engine claims its weight memory, so the reported growth includes it."""
    assert main(["run", str(tiny_models["tiny-gpt2"]), "--budget", "1MiB", "--random-input", "8", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["peak_rss_above_baseline_bytes"] >= res["weights_peak_bytes"]


def _exit_code(args: list[str]) -> int:
    """main's exit code, whether argparse refused the arguments (SystemExit) or the library did."""
    try:
        return main(args)
    except SystemExit as exc:
        return int(exc.code or 0)


@pytest.mark.parametrize(("model", "args", "message"), [
    ("tiny-bert", ["run", "--budget", "1MiB", "--loaders", "0"], "--loaders: must be >= 1, got 0"),
    ("tiny-bert", ["run", "--budget", "1MiB", "--prefetch", "-1"], "--prefetch: must be >= 0, got -1"),
    ("tiny-bert", ["run", "--budget", "1TB"], "more than this machine's RAM"),
    ("tiny-bert", ["run", "--budget", "1MiB", "--random-input", "4", "--batch", "0"], "--batch: must be >= 1"),
    ("tiny-bert", ["run", "--budget", "1MiB", "--save-output", "/nonexistent/dir/x.safetensors"],
     "folder /nonexistent/dir does not exist; create it first"),
    ("tiny-bert", ["plan", "--budget", "1MiB", "-o", "/nonexistent/dir/plan.json"], "folder /nonexistent/dir does not"),
    ("tiny-bert", ["plan", "--budget", "1MiB", "-o", "/tmp"], "/tmp is a folder; give a file name in it"),
    ("tiny-bert", ["profile", "-o", "/nonexistent/p.json"], "folder /nonexistent does not exist"),
    ("tiny-gpt2", ["bench", "--budget", "1MiB", "-o", "/etc/passwd"], "/etc/passwd is a file, not a folder"),
    ("tiny-gpt2", ["bench", "--budget", "1MiB", "-o", "/nonexistent/a/b"], "folder /nonexistent/a does not exist"),
    ("tiny-gpt2", ["bench", "--budget", "1MiB", "--strategies", "pipeload:loaders=x"],
     "loaders must be a whole number >= 1, got 'x'"),
    ("tiny-gpt2", ["bench", "--budget", "1MiB", "--strategies", "pipeload:bogus=1"],
     "'bogus=1' is not an option of pipeload (it takes budget=, loaders=, io=)"),
    ("tiny-gpt2", ["bench", "--budget", "1MiB", "--strategies", "full,pipeload:io=fast"],
     "io must be buffered or direct"),
    ("tiny-gpt2", ["bench", "--budget", "1MiB", "--strategies", "fastest"], "unknown strategy 'fastest'"),
    ("tiny-gpt2", ["bench", "--budget", "1MiB", "--strategies", ","], "no strategy given"),
    ("tiny-gpt2", ["bench", "--budget", "1MiB", "--cpus", "999"], "--cpus 999: this machine gives this process"),
    ("tiny-gpt2", ["bench", "--budget", "1MiB", "--device-ram", "1KB"], "does not exceed the budget 1MiB"),
    ("tiny-gpt2", ["bench", "--budget", "1MiB", "--disk-bw", "fast"], "cannot parse --disk-bw 'fast'"),
    ("tiny-bert", ["profile", "--seq-len", "0"], "--seq-len: must be >= 1, got 0"),
    ("tiny-bert", ["generate", "--budget", "1MiB", "--prompt-ids", "1,2"], "does not generate text"),
    ("tiny-gpt2", ["generate", "--budget", "1MiB", "--prompt-ids", "1,2", "--do-sample", "--temperature", "0"],
       "--temperature: must be > 0"),
    ("tiny-gpt2", ["generate", "--budget", "1MiB", "--prompt-ids", "1,2", "--temperature", "-1"],
     "--temperature: must be > 0"),
    ("tiny-gpt2", ["generate", "--budget", "1MiB", "--prompt-ids", "1,2", "--top-k", "-4"], "--top-k: must be >= 1"),
    ("tiny-gpt2", ["generate", "--budget", "1MiB", "--prompt-ids", "1,2", "--top-p", "5"],
     "--top-p: must lie in (0, 1], got 5"),
    ("tiny-gpt2", ["bench", "--budget", "abc"], "cannot parse budget 'abc'"),
    ("tiny-gpt2", ["bench", "--budget", "1MiB", "--repeat", "0"], "--repeat: must be >= 1"),
    ("tiny-gpt2", ["bench", "--budget", "auto"], "'auto' (the memory this process may still take) is for run and"),
    ("tiny-gpt2", ["plan", "--budget", "auto"], "plan and bench compare fixed budgets"),
])
def test_careless_arguments_exit_2_with_a_clear_message_and_write_nothing(tiny_models, tmp_path, capsys, model,
                                                                           args, message):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text("previous")
    cmd, *rest = args
    full = [cmd, str(tiny_models[model]), *rest] + (["-o", str(out)] if cmd == "bench" and "-o" not in rest else [])
    assert _exit_code(full) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert [p.name for p in out.iterdir()] == ["results.json"] and (out / "results.json").read_text() == "previous"
    assert not Path("/nonexistent").exists()


def test_synth_refuses_an_unwritable_or_existing_checkpoint(tmp_path, capsys):
    assert _exit_code(["synth", "tiny-bert", "/proc/forbidden"]) == 2
    assert "cannot write a checkpoint into /proc/forbidden" in capsys.readouterr().err
    assert _exit_code(["synth", "tiny-bert", str(tmp_path / "m")]) == 0
    before = (tmp_path / "m" / "model.safetensors").read_bytes()
    assert _exit_code(["synth", "tiny-bert", str(tmp_path / "m"), "--seed", "7"]) == 2
    assert "already holds a checkpoint" in capsys.readouterr().err
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == before  # not overwritten
    assert _exit_code(["synth", "tiny-bert", str(tmp_path / "m"), "--seed", "7", "--force"]) == 0
    assert (tmp_path / "m" / "model.safetensors").read_bytes() != before
    mask = os.umask(0)
    os.umask(mask)
    for f in (tmp_path / "m").iterdir():  # written files get the usual mode, not mkstemp's 0600
        assert f.stat().st_mode & 0o777 == 0o666 & ~mask


def test_version_and_help_texts(capsys):
    assert _exit_code(["--version"]) == 0
    assert capsys.readouterr().out.startswith("hermes ")
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, p in sub.choices.items():
        for action in p._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"hermes {name} {action.option_strings[0]} has no help text"


def test_token_ids_outside_the_vocabulary_through_the_python_api(tiny_models):
    import hermes
    from hermes.errors import InputError

    model = hermes.load(tiny_models["tiny-bert"], budget="1MiB")
    with pytest.raises(InputError, match=r"token ids must lie in \[0, 999\].*got values in \[1, 5000\]"), \
            torch.no_grad():
        model(input_ids=torch.tensor([[1, 5000]]))
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 2]]))  # the model still works


def test_demo_ends_by_showing_the_streamed_output_equals_the_full_model(tmp_path, capsys):
    assert main(["demo", "--arch", "tiny-bert", "--cache", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "same outputs as the full model: last_hidden_state, pooler_output bit-exact" in out
    assert "weights peak" in out and "tmp" not in out.split("weights peak")[1].split("\n")[0]


def test_plan_and_run_name_the_same_budgets(tiny_models, tmp_path, capsys):
    """The weight budget and predicted weights peak read the same in `plan`, `plan --explain` and `run`."""
    import re
    import shutil

    path = tmp_path / "bert"
    shutil.copytree(tiny_models["tiny-bert"], path)
    assert main(["profile", str(path), "--seq-len", "16", "--repeat", "1"]) == 0
    capsys.readouterr()
    assert main(["plan", str(path), "--budget", "1MiB", "--seq-len", "16", "--explain"]) == 0
    out = capsys.readouterr().out
    chosen = next(line for line in out.splitlines() if "CHOSEN" in line)
    summary = out.strip().splitlines()[-1]
    w_budget, w_peak = re.search(r"w\. budget (\S+ \S+) \(w\. peak (\S+ \S+)\)", summary).groups()
    assert w_budget in chosen and w_peak in chosen
    assert main(["run", str(path), "--budget", "1MiB", "--random-input", "16"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if "weights peak" in x)
    assert f"of weight budget {w_budget} (planned)" in line


@pytest.mark.parametrize(("name", "shapes"), [
    ("t5", {"input_ids": [1, 8], "attention_mask": [1, 8], "decoder_input_ids": [1, 1]}),
    ("whisper", {"input_features": [1, 16, 32], "decoder_input_ids": [1, 1]}),
    ("wav2vec2", {"input_values": [1, 2560]}),
    ("clip", {"pixel_values": [1, 3, 32, 32], "input_ids": [1, 8], "attention_mask": [1, 8]}),
])
def test_run_builds_random_inputs_for_every_kind_of_model(tmp_path, capsys, name, shapes):
    from hermes import zoo

    path = zoo.save(zoo.BY_NAME[name], tmp_path / name)
    assert main(["run", str(path), "--budget", "1MiB", "--random-input", "8", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["input_shape"] == shapes
    if name == "clip":  # text alone is not enough for CLIP: a clear message, not a traceback
        assert _exit_code(["run", str(path), "--budget", "1MiB", "--input-ids", "5,6"]) == 2
        assert "takes text+image; use --random-input N" in capsys.readouterr().err


def test_a_failed_write_names_the_file_and_leaves_it_as_it_was(tiny_models, tmp_path, capsys):
    import errno

    from hermes.atomic import atomic_path, atomic_write_text
    from hermes.errors import InputError

    target = tmp_path / "plan.json"
    atomic_write_text(target, "previous")
    with pytest.raises(InputError, match=r"cannot write .*plan.json: No space left on device; .* left as it was"), \
            atomic_path(target) as tmp:
        tmp.write_text("half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert target.read_text() == "previous" and [p.name for p in tmp_path.iterdir()] == ["plan.json"]
    # a filesystem that refuses new files: the CLI names the file, no traceback
    assert _exit_code(["profile", str(tiny_models["tiny-gpt2"]), "--seq-len", "4", "--repeat", "1",
                       "-o", "/proc/hermes-profile.json"]) == 2
    err = capsys.readouterr().err
    assert "cannot write /proc/hermes-profile.json" in err and "Traceback" not in err


@pytest.mark.parametrize("text, ids", [("464,2068", [464, 2068]), ("464 2068", [464, 2068]),
                                       ("464, 2068 ,7586", [464, 2068, 7586]), (" 5 ", [5])])
def test_token_ids_take_commas_or_spaces(text, ids):
    """'464 2068' is two ids (it was read as the single id 4642068)."""
    from hermes.cli.argtypes import token_ids

    assert token_ids(text) == ids


def test_token_ids_that_are_not_integers_are_refused():
    from hermes.cli.argtypes import token_ids

    with pytest.raises(argparse.ArgumentTypeError, match="separated by commas or spaces"):
        token_ids("464 abc")


@pytest.mark.parametrize("kind", ["file", "dir"])
def test_temporary_files_of_a_killed_writer_are_removed_by_the_next_write(tmp_path, kind):
    """kill -9 in the middle of an atomic write (hermes synth, convert, plan, ...) leaves its temporary file or
    directory behind; the next write to that place removes it (its writer's PID is dead) and nothing else."""
    import signal
    import subprocess
    import sys

    target = tmp_path / ("out.json" if kind == "file" else "ckpt")
    how = "atomic_path(sys.argv[1]) as t: t.write_bytes(b'x' * 1000)" if kind == "file" else \
        "atomic_dir(sys.argv[1]) as t: (t / 'w').write_bytes(b'x' * 1000)"
    code = (f"import sys, time\nfrom hermes.atomic import atomic_dir, atomic_path\nwith {how}; "
            "print('writing', flush=True); time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(target)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    left = list(tmp_path.glob(".*hermes-tmp*"))
    assert len(left) == 1 and not target.exists()
    other = tmp_path / ".out.json.hermes-tmp-abc-1.tmp" if kind == "file" else tmp_path / ".ckpt.hermes-tmp-x-1"
    other.write_text("pid 1 is alive: not removed") if kind == "file" else other.mkdir()
    from hermes.atomic import atomic_dir, atomic_path

    if kind == "file":
        with atomic_path(target) as t:
            t.write_text("{}")
    else:
        with atomic_dir(target) as t:
            (t / "w").write_text("done")
    assert target.exists() and sorted(tmp_path.glob(".*hermes-tmp*")) == [other]
