"""`--workers auto` (lmfleet/cli/cores.py): the affinity mask's cores, capped by the
container's CPU limit as its cgroup files say it, read from cgroup trees laid out as
the kernel lays them out (v2, v1, and the host's path absent inside a container)."""

from __future__ import annotations

import os
from pathlib import Path

from lmfleet.cli.cores import cpu_quota, usable_cores

AFFINITY = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def write(folder: Path, **files: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name.replace("_", ".", 1)).write_text(text + "\n")


def test_v2_takes_the_smallest_quota_on_the_cgroup_and_its_ancestors(tmp_path: Path) -> None:
    """A Kubernetes pod limited to 2.5 CPUs; the container inside it sets none."""
    write(tmp_path, cgroup_controllers="cpu memory", cpu_max="max 100000")
    write(tmp_path / "kubepods" / "pod1", cpu_max="250000 100000")
    write(tmp_path / "kubepods" / "pod1" / "ctr", cpu_max="max 100000")
    membership = "0::/kubepods/pod1/ctr\n"
    assert cpu_quota(tmp_path, membership) == 2.5
    assert usable_cores(tmp_path, membership) == min(AFFINITY or 1, 2)  # rounded down


def test_v1_inside_a_container_reads_its_own_cgroup_at_the_mount_root(tmp_path: Path) -> None:
    """Docker `--cpus 1.5` on cgroup v1: /proc/self/cgroup names the host's path,
    which is not there inside the container; the container's cgroup is the root."""
    write(tmp_path / "cpu,cpuacct", cpu_cfs_quota_us="150000", cpu_cfs_period_us="100000")
    write(tmp_path / "memory")
    membership = "4:memory:/docker/abc\n2:cpu,cpuacct:/docker/abc\n0::/\n"
    assert cpu_quota(tmp_path, membership) == 1.5
    assert usable_cores(tmp_path, membership) == 1


def test_no_quota_leaves_the_affinity_and_a_fraction_of_a_core_is_one(tmp_path: Path) -> None:
    write(tmp_path / "cpu", cpu_cfs_quota_us="-1", cpu_cfs_period_us="100000")
    assert cpu_quota(tmp_path, "1:cpu:/\n") is None
    assert usable_cores(tmp_path, "1:cpu:/\n") == AFFINITY
    assert cpu_quota(tmp_path, "not a cgroup line\n") is None
    write(tmp_path / "cpu", cpu_cfs_quota_us="50000")
    assert usable_cores(tmp_path, "1:cpu:/\n") == 1
    write(tmp_path / "cpu", cpu_cfs_quota_us="100000000")  # 1000 CPUs: the mask decides
    assert usable_cores(tmp_path, "1:cpu:/\n") == AFFINITY
