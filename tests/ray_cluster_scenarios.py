"""Packed sweeps on a real two-node Ray cluster, run by tests/test_placement.py inside a network
namespace that has only loopback (`unshare -n`, `ip link set lo up`), so that no byte of the
cluster's traffic leaves this machine. One cluster for every scenario:

- `plain`: the 8-job sweep, one task per pack of 4, one pack per node;
- `node_lost`: the same sweep, with the node of one pack removed once that pack's members have a
  checkpoint; Ray runs the task again on the other node;
- `no_node_has`, `nobody_there`: settings refused in one line before anything trains.

Usage: python tests/ray_cluster_scenarios.py OUT_DIR SWEEP_ARGS_JSON; writes OUT_DIR/scenarios.json.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from ray.cluster_utils import Cluster

REPO = Path(__file__).resolve().parent.parent


def sweep(out: Path, name: str, args: list, extra: list, wait: bool = True):
    command = [sys.executable, "-m", "ptlab.cli.train", "-m", "hydra/launcher=packed",
               f"hydra.sweep.dir={out / name}", *args, *extra]  # fmt: skip
    log = open(out / f"{name}.log", "w")
    process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True)
    if wait:
        process.wait(timeout=600)
    return process


def holder_pid(folder: Path):
    try:
        return json.loads((folder / ".ptlab.holder.json").read_text())["pid"]
    except (OSError, ValueError, KeyError):
        return None


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def validated(folder: Path) -> int:
    """The last step at which the member evaluated (its checkpoint of that step comes after)."""
    try:
        lines = (folder / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return 0
    steps = [json.loads(line)["step"] for line in lines if '"validation"' in line and line.endswith("}")]
    return max(steps, default=0)


def checkpoint_step(folder: Path) -> int:
    """The step of a member's last checkpoint, found as a resume finds it (0: none yet)."""
    from ptlab.training.checkpoint import find, load_training_state

    try:
        last = find(folder / "checkpoints" / "last")
        return load_training_state(last)["train_state"]["step"] if last else 0
    except OSError:  # swapped out between finding and reading it
        return 0


def remove_node_mid_pack(
    cluster: Cluster, nodes: dict, sweep_dir: Path, pack_jobs: list, max_steps: int
) -> dict:
    """Once a member of a pack has a checkpoint and has not finished, remove the node its worker
    runs on; returns which node and jobs, and each member's checkpoint step just before."""
    deadline = time.time() + 300
    while time.time() < deadline:
        for jobs in pack_jobs:
            folders = [sweep_dir / str(job) for job in jobs]
            pid = holder_pid(folders[0])
            if pid is None or validated(folders[0]) >= max_steps or not checkpoint_step(folders[0]):
                continue  # the validation line comes before its checkpoint: wait for the checkpoint
            try:
                raylet = parent_of(pid)
            except OSError:
                continue
            for name, node in nodes.items():
                if node.all_processes["raylet"][0].process.pid == raylet:
                    at = {str(job): checkpoint_step(folder) for job, folder in zip(jobs, folders)}
                    cluster.remove_node(node)  # Ray's retry may start (and checkpoint) before the worker is gone
                    return {"node": name, "jobs": jobs, "worker_pid": pid, "checkpoint_at_removal": at}
        time.sleep(0.05)
    raise RuntimeError("no pack reached a checkpoint on a worker node")


def main() -> None:
    out, args = Path(sys.argv[1]), json.loads(sys.argv[2])
    started = time.time()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})  # the head runs no pack
    nodes = {"a": cluster.add_node(num_cpus=1), "b": cluster.add_node(num_cpus=1)}
    cluster.wait_for_nodes()
    report = {"cluster_up_s": time.time() - started, "address": cluster.address}
    at = [f"+hydra.launcher.ray.address={cluster.address}"]

    t = time.time()
    report["plain"] = {"rc": sweep(out, "plain", args, at).returncode, "wall_s": time.time() - t}

    t = time.time()
    process = sweep(out, "node_lost", args, at, wait=False)
    max_steps = int(next(arg for arg in args if arg.startswith("trainer.max_steps=")).split("=")[1])
    removed = remove_node_mid_pack(cluster, nodes, out / "node_lost", [[0, 1, 2, 3], [4, 5, 6, 7]], max_steps)
    removed["rc"] = process.wait(timeout=600)
    removed["wall_s"] = time.time() - t
    removed["worker_alive_after"] = Path(f"/proc/{removed['worker_pid']}").exists()
    report["node_lost"] = removed

    for name, extra in {
        "no_node_has": [*at, "+hydra.launcher.ray.num_gpus=1"],
        "nobody_there": ["+hydra.launcher.ray.address=127.0.0.1:9"],
    }.items():
        t = time.time()
        report[name] = {"rc": sweep(out, name, args, extra).returncode, "wall_s": time.time() - t}
    cluster.shutdown()
    (out / "scenarios.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")
    main()
