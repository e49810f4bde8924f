"""`hydra.launcher.ray={...}`: one Ray task per pack, on the cluster at `address` (default: the one
`RAY_ADDRESS` or `ray start` names, else a local one started for the sweep).

Placement, resources and retries are Ray's: each task asks for the resources of one pack
(`num_gpus`, `num_cpus`, `memory`; one GPU by default when the jobs are on CUDA), and a task whose
node is lost is run again on another (`max_retries`). Its members resume from the checkpoints in
their folders, which must be on a filesystem every node sees; finished members are skipped.
"""

from __future__ import annotations

import logging
import math
import os
import socket
from typing import Any, Dict, List, Mapping, Sequence

from ptlab.errors import ConfigError
from ptlab.sweep.places import PackEnded, PlacedPack, first_line, lost, run_placed_pack

log = logging.getLogger("ptlab")

SETTINGS = {"address", "num_gpus", "num_cpus", "memory", "runtime_env", "max_retries"}


def connect(settings: Mapping[str, Any]) -> None:
    """Join (or start) the cluster once; an address where no cluster answers is one line."""
    import ray

    if ray.is_initialized():
        return
    address = settings.get("address") or os.environ.get("RAY_ADDRESS")
    if address and address != "auto":
        check_reachable(address)
    try:
        ray.init(address=address, runtime_env=settings.get("runtime_env"), include_dashboard=False,
                 logging_level=logging.WARNING)  # fmt: skip
    except Exception as error:  # noqa: BLE001 - ray raises ConnectionError, ValueError or RuntimeError
        raise ConfigError(
            f"hydra.launcher.ray.address={address!r}: Ray could not join or start a cluster ({first_line(error)}); "
            "give the head's address (host:6379, or ray://host:10001), or leave it unset to start a local one"
        ) from None


def check_reachable(address: str) -> None:
    """Ray waits minutes for an address where nothing listens; a TCP connection says in seconds."""
    host, _, port = address.split("://")[-1].rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=5).close()
    except (OSError, ValueError) as error:
        raise ConfigError(
            f"hydra.launcher.ray.address={address!r}: no Ray cluster answers there ({error}); give the head's "
            "address (host:6379, or ray://host:10001), or leave it unset to start a local one"
        ) from None


def pack_resources(settings: Mapping[str, Any], on_gpu: bool) -> Dict[str, float]:
    """What each pack's task asks Ray for."""
    need = {"GPU": float(settings.get("num_gpus", 1 if on_gpu else 0)), "CPU": float(settings.get("num_cpus", 1))}
    if settings.get("memory"):
        need["memory"] = float(settings["memory"])
    return need


def ray_devices(settings: Mapping[str, Any], on_gpu: bool) -> int:
    """How many packs the cluster runs at once; resources no node has are one line."""
    import ray

    connect(settings)
    need = {key: value for key, value in pack_resources(settings, on_gpu).items() if value > 0}
    nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
    at_once = [min(math.floor(node.get(key, 0) / value) for key, value in need.items()) for node in nodes]
    if not any(at_once):
        has = "; ".join(", ".join(f"{k}={v:g}" for k, v in sorted(n.items()) if k in need) or "nothing" for n in nodes)
        asked = ", ".join(f"{key}={value:g}" for key, value in need.items())
        raise ConfigError(
            f"hydra.launcher.ray asks {asked} for each pack, and no node of the cluster has that (its nodes: {has}): "
            "ask for less (hydra.launcher.ray.num_gpus / num_cpus / memory) or add a node that has it"
        )
    return max(1, sum(at_once))


def on_ray(packs: Sequence[PlacedPack], settings: Dict[str, Any], ended: PackEnded) -> None:
    """One task per pack; each pack is reported as its task ends, a task Ray gave up on fails its
    pack's members alone."""
    import ray

    connect(settings)
    on_gpu = any(job.config.hardware.device == "cuda" for pack in packs for job in pack.jobs)
    need = pack_resources(settings, on_gpu)
    task = ray.remote(run_placed_pack).options(
        num_gpus=need["GPU"], num_cpus=need["CPU"], memory=need.get("memory"),
        max_retries=int(settings.get("max_retries", 3)), retry_exceptions=False,
    )  # fmt: skip
    running = {task.remote(pack.jobs, pack.size): pack for pack in packs}
    log.info("hydra.launcher.ray: %d pack tasks on the cluster, each asking %s", len(running),
             ", ".join(f"{key}={value:g}" for key, value in need.items() if value))  # fmt: skip
    pending: List[Any] = list(running)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        pack = running[done[0]]
        try:
            values = ray.get(done[0])
        except Exception as error:  # noqa: BLE001 - retries spent, or the task's worker died
            values = lost(pack, f"its Ray task failed ({first_line(error)})")
        ended(pack, values)
