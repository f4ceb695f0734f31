"""How many cores this process may use: what `lmfleet serve --workers auto` starts.

The CPU affinity mask says which cores the process may run on, but not how much
of them: a container's CPU limit (Docker's `--cpus`, a Kubernetes pod's
`limits.cpu`) is a CFS quota on its cgroup, and inside such a container the mask
still lists every core of the host. One worker per host core in a pod limited to
two CPUs would start dozens of proxies that the quota then throttles in turn. So
the count is the affinity mask's, capped by the smallest quota on the process's
cgroup and its ancestors (cgroup v2 `cpu.max`, v1 `cpu.cfs_quota_us` over
`cpu.cfs_period_us`), rounded down (a fraction of a core left to the supervisor),
and at least one: as Go's automaxprocs does.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def usable_cores(root: Path = CGROUP_ROOT, membership: str | None = None) -> int:
    """The cores this process may use (see the module docstring). `root` and
    `membership` (the text of `/proc/self/cgroup`) are where to read, for tests."""
    if hasattr(os, "sched_getaffinity"):
        cores = len(os.sched_getaffinity(0))
    else:
        cores = os.cpu_count() or 1
    quota = cpu_quota(root, membership)
    if quota is not None:
        cores = min(cores, max(1, math.floor(quota)))
    return max(1, cores)


def cpu_quota(root: Path = CGROUP_ROOT, membership: str | None = None) -> float | None:
    """The CPUs the process's cgroups allow (the smallest quota over its period on
    its cgroup and their ancestors); None where none is set or none can be read."""
    if membership is None:
        try:
            membership = Path("/proc/self/cgroup").read_text()
        except OSError:
            return None
    quotas = [q for folder in _cpu_folders(root, membership) if (q := _quota(folder)) is not None]
    return min(quotas, default=None)


def _cpu_folders(root: Path, membership: str) -> Iterator[Path]:
    """The folders whose quota applies: the process's cgroup (v2, and v1's `cpu`
    controller) and each ancestor, under where the hierarchy is mounted. Inside a
    container the path named may be the host's, absent here, where the container's
    own cgroup is the mount's root: the root is read too."""
    for line in membership.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":  # cgroup v2: one hierarchy (beside v1's: `unified`)
            mounts = [root if (root / "cgroup.controllers").exists() else root / "unified"]
        elif "cpu" in controllers.split(","):
            # Mounted under its controllers (`cpu,cpuacct`) or `cpu`: one folder when both.
            mounts = list(dict.fromkeys([root / controllers, root / "cpu"]))
        else:
            continue
        for mount in mounts:
            folder = mount / path.strip("/")
            while True:
                yield folder
                if folder == mount:
                    break
                folder = folder.parent


def _quota(folder: Path) -> float | None:
    """The quota set on one cgroup folder, in CPUs; None for none (or unreadable)."""
    try:
        text = (folder / "cpu.max").read_text().split()
        if len(text) == 2 and text[0] != "max":
            return int(text[0]) / int(text[1])
        if text:
            return None
    except (OSError, ValueError, ZeroDivisionError):
        pass
    try:
        quota = int((folder / "cpu.cfs_quota_us").read_text())
        period = int((folder / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None
