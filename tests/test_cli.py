"""The CLI: run / synth / bench print what they promise, and bad input exits non-zero with a clear message."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from hermes.cli import main
from hermes.errors import BudgetError
from hermes.memory import format_bytes, parse_bytes

from .conftest import reference_model


def test_run_json_has_the_documented_fields(tiny_models, tmp_path, capsys):
    out = tmp_path / "out.safetensors"
    code = main(["run", str(tiny_models["tiny-gpt2"]), "--budget", "1MiB", "--loaders", "2",
                 "--input-ids", "1,2,3,4,5", "--save-output", str(out), "--json", "--timeline"])
    assert code == 0
    res = json.loads(capsys.readouterr().out)
    for key in ("latency_s", "stall_s", "loaders", "budget_bytes", "weights_peak_bytes", "baseline_rss_bytes",
                "peak_rss_bytes", "output_path", "events", "memory"):
        assert key in res
    assert res["budget_bytes"] == 2**20 and 0 < res["weights_peak_bytes"] <= 2**20
    assert res["loaders"] == 2 and res["output_path"] == str(out)
    assert [e["name"] for e in res["events"]][:2] == ["transformer.wte", "transformer.wpe"]
    with torch.no_grad():
        want = reference_model(tiny_models["tiny-gpt2"])(input_ids=torch.tensor([[1, 2, 3, 4, 5]])).logits
    torch.testing.assert_close(load_file(out)["logits"], want, rtol=0, atol=0)
    assert not list(tmp_path.glob(".*.tmp"))


def test_run_text_with_real_tokenizer(minilm, capsys):
    assert main(["run", str(minilm), "--budget", "60MiB", "--text", "edge devices", "--io", "direct"]) == 0
    printed = capsys.readouterr().out
    assert "latency" in printed and "weights peak" in printed and "of budget 60.0 MiB" in printed


def test_run_image_model_with_random_input(tiny_models, capsys):
    assert main(["run", str(tiny_models["tiny-vit"]), "--budget", "1MiB", "--random-input", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["input_shape"] == {"pixel_values": [1, 3, 32, 32]}


@pytest.mark.parametrize(("args", "message"), [
    (["--budget", "12 potatoes"], "cannot parse budget '12 potatoes'"),
    (["--budget=-5MiB"], "budget must be positive"),
    (["--budget", "0"], "budget must be positive"),
    (["--budget", "10KiB"], "below the minimum"),
    (["--budget", "1MiB", "--text", "hi"], "no usable tokenizer"),
    (["--budget", "1MiB", "--input-ids", "5,999999"], "token ids must lie in [0, 999]"),
    (["--budget", "1MiB", "--random-input", "500"], "takes at most 128"),
    (["--budget", "1MiB", "--image", "x.png"], "takes text, not images"),
])
def test_bad_input_exits_2_with_a_clear_message(tiny_models, capsys, args, message):
    assert main(["run", str(tiny_models["tiny-bert"]), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hermes: error:") and message in err and "Traceback" not in err


def test_synth_cli(tmp_path, capsys):
    assert main(["synth", "tiny-gptj", str(tmp_path / "gj"), "--dtype", "float16", "--seed", "7"]) == 0
    assert (tmp_path / "gj" / "model.safetensors").is_file()
    assert json.loads((tmp_path / "gj" / "config.json").read_text())["dtype"] == "float16"


def test_bench_cli_writes_json_and_markdown(tiny_models, tmp_path, capsys):
    out = tmp_path / "res"
    code = main(["bench", str(tiny_models["tiny-bert"]), "--budget", "1MiB", "--repeat", "1", "--no-bounds",
                 "--strategies", "full,pipeload:loaders=1;io=direct,sequential,pipeswitch", "-o", str(out)])
    assert code == 0
    res = json.loads((out / "results.json").read_text())
    assert res["format_version"] == 1 and len(res["runs"]) == 4
    assert all("error" not in r for r in res["runs"]), res["runs"]
    summary = res["summary"]
    assert summary["pipeswitch"]["weights_peak_bytes"] >= summary["sequential"]["weights_peak_bytes"]
    assert summary["pipeload:loaders=1,io=direct"]["weights_peak_bytes"] <= 2**20
    assert "| full |" in (out / "results.md").read_text()


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
