"""A ring device's OpenMP workers spin less after each parallel region (hermes.omp): set before torch loads its
runtime, only on a ring's device, never over the user's own setting."""
from __future__ import annotations

import os
import subprocess
import sys

from hermes.omp import RING_SPINCOUNT, is_ring_process, ring_spin

TORCHRUN = {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}


def test_a_ring_device_is_known_by_its_command_line_or_torchrun():
    assert is_ring_process(["generate", "m", "--ring", "h:1", "--rank", "1"], {})
    assert is_ring_process(["serve", "m", "--ring=h:1"], {})
    assert is_ring_process(["generate", "m"], TORCHRUN)
    assert not is_ring_process(["generate", "m", "--rings"], {})
    assert not is_ring_process(["generate", "m"], {"RANK": "1", "WORLD_SIZE": "2"})


def test_the_spin_count_is_set_only_where_nothing_else_decided_it():
    env: dict[str, str] = {}
    assert ring_spin(["generate", "m", "--ring", "h:1"], env, loaded=False)
    assert env == {"GOMP_SPINCOUNT": str(RING_SPINCOUNT)}
    for kept in ({"GOMP_SPINCOUNT": "7"}, {"OMP_WAIT_POLICY": "passive"}):
        env = dict(kept)
        assert not ring_spin(["--ring", "h:1"], env, loaded=False) and env == kept
    env = {}
    assert not ring_spin(["--ring", "h:1"], env, loaded=True) and env == {}  # torch's runtime has read its settings
    assert not ring_spin(["generate", "m"], env, loaded=False) and env == {}  # one device: OpenMP's default


def test_importing_hermes_on_a_ring_sets_it_before_torch_loads():
    code = ("import os, sys; sys.argv = ['hermes', 'generate', 'm', '--ring', 'h:1']; import hermes, torch; "
            "print(os.environ.get('GOMP_SPINCOUNT'))")
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(RING_SPINCOUNT)]
