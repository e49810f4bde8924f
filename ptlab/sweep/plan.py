"""A sweep's packs, planned in the driver before any model loads, balanced over its devices.

Each group of jobs that can share a backbone (ptlab/sweep/grouping.py) gets the fewest packs of at
most its cap (`hydra.launcher.pack_size`, else an estimate of what fits one device), and then more,
smaller packs while that takes no extra round of packs on the devices: 48 jobs that fit 10 to a GPU
make 6 packs of 8 on 6 GPUs, not 5 packs of 10 that leave one idle, and 8 packs of 6 on 4 GPUs (two
rounds either way, the smaller packs step faster). A pack's members differ in size by one at most.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Sequence

from ptlab.sweep.grouping import Group
from ptlab.training.pack_size import balanced


@dataclass
class PlannedPack:
    """One pack of the plan: its group (index into the sweep's groups) and its jobs (indices into
    the sweep's jobs)."""

    group: int
    jobs: List[int]


def pack_counts(sizes: Sequence[int], caps: Sequence[int], devices: int) -> List[int]:
    """How many packs each group gets: the fewest its cap allows, then more while the packs fill no
    more rounds of `devices` than those did; a new pack goes to the group whose packs are largest."""
    counts = [math.ceil(n / max(1, cap)) for n, cap in zip(sizes, caps)]
    rounds = math.ceil(sum(counts) / max(1, devices))
    target = min(sum(sizes), rounds * max(1, devices))
    while sum(counts) < target:
        largest = max(range(len(sizes)), key=lambda g: (math.ceil(sizes[g] / counts[g]), -g))
        counts[largest] += 1
    return counts


def plan_packs(groups: Sequence[Group], caps: Sequence[int], devices: int) -> List[PlannedPack]:
    """Every job of every group in exactly one pack, in sweep order."""
    counts = pack_counts([len(g.jobs) for g in groups], caps, devices)
    return [
        PlannedPack(index, jobs)
        for index, (group, count) in enumerate(zip(groups, counts))
        for jobs in balanced(group.jobs, count)
    ]


def packing_report(
    groups: Sequence[Group], plan: Sequence[PlannedPack], caps: Sequence[int], devices: int, numbers: Sequence[int]
) -> List[str]:  # fmt: skip
    """One line per pack: its jobs (`numbers[i]`: job i's number in the sweep) and why it is not with
    the pack before it: its group's reason for the first pack of a group, else how the group was cut."""
    lines, seen = [], set()
    for number, pack in enumerate(plan, 1):
        group = groups[pack.group]
        if pack.group in seen:
            count = sum(1 for other in plan if other.group == pack.group)
            on = f"{devices} device" + ("s" if devices != 1 else "")
            why = f"{len(group.jobs)} jobs in {count} packs (pack_size={caps[pack.group]}, {on})"
        else:
            why = group.why
        seen.add(pack.group)
        shown = ",".join(str(numbers[job]) for job in pack.jobs)
        lines.append(f"pack {number}: jobs {shown} ({len(pack.jobs)} runs)" + (f": {why}" if why else ""))
    return lines
