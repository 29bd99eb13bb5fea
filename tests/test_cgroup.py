"""``budget="auto"`` reads the device's limit from cgroup v2 (what most current machines and CI images use) and
v1, on fake hierarchies laid out as the kernel lays them out."""
from __future__ import annotations

import functools
from pathlib import Path

from hermes import memory

MiB = 2**20


def _write(d: Path, **files: str) -> None:
    d.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (d / name.replace("_", ".", 1)).write_text(text)


def _stat_v2(file_bytes: int, shmem: int = 0, mapped: int = 0) -> str:
    return (f"anon 1000\nfile {file_bytes + shmem}\nfile_mapped {mapped}\nshmem {shmem}\n"
            f"active_file {file_bytes // 2}\ninactive_file {file_bytes - file_bytes // 2}\n")


def test_v2_takes_the_level_that_leaves_least_room_and_excludes_page_cache(tmp_path):
    root = tmp_path / "cgroup"
    (tmp_path / "self").write_text("0::/user.slice/app.scope\n")
    _write(root, memory_stat=_stat_v2(0))  # the root group has no memory.max
    _write(root / "user.slice", memory_max=str(1024 * MiB), memory_current=str(900 * MiB),
           memory_stat=_stat_v2(500 * MiB, shmem=50 * MiB, mapped=40 * MiB))
    _write(root / "user.slice" / "app.scope", memory_max="max", memory_current=str(100 * MiB),
           memory_stat=_stat_v2(10 * MiB))
    limit, room, source = memory.cgroup_memory_room(root=str(root), membership=str(tmp_path / "self"))
    assert limit == 1024 * MiB and source == f"{root}/user.slice/memory.max"
    # reclaimable page cache back; shared memory and mapped files (the code running) are not
    assert room == 1024 * MiB - 900 * MiB + 500 * MiB - 40 * MiB
    _write(root / "user.slice" / "app.scope", memory_max=str(300 * MiB))  # now the leaf is tighter
    limit, room, source = memory.cgroup_memory_room(root=str(root), membership=str(tmp_path / "self"))
    assert (limit, room) == (300 * MiB, 300 * MiB - 100 * MiB + 10 * MiB) and source.endswith("app.scope/memory.max")


def test_v2_in_a_container_namespace_reads_the_mount_root(tmp_path):
    root = tmp_path / "cgroup"
    (tmp_path / "self").write_text("0::/\n")
    _write(root, memory_max=str(2048 * MiB), memory_current=str(512 * MiB), memory_stat=_stat_v2(0))
    assert memory.cgroup_memory_room(root=str(root), membership=str(tmp_path / "self"))[:2] == (
        2048 * MiB, 1536 * MiB)


def test_no_limit_anywhere_is_none(tmp_path):
    root = tmp_path / "cgroup"
    (tmp_path / "self").write_text("0::/a\n")
    _write(root / "a", memory_max="max", memory_current="1", memory_stat=_stat_v2(0))
    assert memory.cgroup_memory_room(root=str(root), membership=str(tmp_path / "self")) is None
    assert memory.cgroup_memory_room(root=str(root), membership=str(tmp_path / "missing")) is None


def test_v1_uses_the_hierarchical_limit(tmp_path):
    root = tmp_path / "cgroup"
    (tmp_path / "self").write_text("12:pids:/x\n9:memory:/dev/run\n0::/\n")
    _write(root / "memory" / "dev" / "run", memory_limit_in_bytes=str(2**62), memory_usage_in_bytes=str(200 * MiB),
           memory_stat=f"hierarchical_memory_limit {700 * MiB}\ntotal_inactive_file {50 * MiB}\n"
                       f"total_active_file {30 * MiB}\ntotal_mapped_file {20 * MiB}\n")
    limit, room, _ = memory.cgroup_memory_room(root=str(root), membership=str(tmp_path / "self"))
    assert (limit, room) == (700 * MiB, 700 * MiB - 200 * MiB + 80 * MiB - 20 * MiB)


def test_auto_budget_follows_a_v2_limit_below_memavailable(tmp_path, monkeypatch):
    root = tmp_path / "cgroup"
    (tmp_path / "self").write_text("0::/box\n")
    _write(root / "box", memory_max=str(600 * MiB), memory_current=str(350 * MiB), memory_stat=_stat_v2(0))
    monkeypatch.setattr(memory, "cgroup_memory_room", functools.partial(
        memory.cgroup_memory_room, root=str(root), membership=str(tmp_path / "self")))
    monkeypatch.setattr(memory, "_kib_field", lambda path, field: 20 * 2**30)  # a big machine
    a = memory.auto_budget()
    assert a.budget_bytes == 250 * MiB  # the limit less what the group holds (its runtime slack inside)
    assert "box/memory.max" in a.describe()
