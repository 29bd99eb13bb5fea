"""The README says what the CLI does: every `hermes` line of "Use it" parses, names what exists, and the
catalogue of `hermes synth` is the one the README lists."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from hermes.cli import build_parser
from hermes.synth import ARCHS

README = (Path(__file__).parents[1] / "README.md").read_text()


def _commands() -> list[str]:
    block = README.split("## Use it", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    joined = block.replace("\\\n", " ")
    return [line.split("  #", 1)[0].strip() for line in joined.splitlines() if line.startswith("hermes ")]


def test_readme_lists_every_synth_architecture():
    listed = set(re.findall(r"`((?:tiny-)?[a-z0-9.-]+)`", README.split("`hermes synth` knows", 1)[1][:400]))
    assert set(ARCHS) <= listed


@pytest.mark.parametrize("line", _commands())
def test_every_use_it_line_parses(line):
    argv = shlex.split(line)[1:]
    args = build_parser().parse_args(argv)  # SystemExit (a failed test) on a flag the CLI does not have
    assert args.command == argv[0]


def test_use_it_paths_are_the_demos_and_synths():
    lines = _commands()
    synthesized = {shlex.split(x)[3] for x in lines if x.startswith("hermes synth ")}
    assert "ckpt/bert-large" in synthesized and "ckpt/gpt2" in synthesized
    demo = (Path(__file__).parents[1] / "scripts" / "demo.sh").read_text()
    assert "--cache ckpt" in demo  # the demo's checkpoint is ckpt/bert-large, where the lines look
    for line in lines:
        for path in re.findall(r"ckpt/[a-z0-9.-]+", line):
            assert path in synthesized or path.endswith(("-q4", "from-gguf")), line
