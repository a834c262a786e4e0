"""Can every node of the Ray cluster see a local store folder? Asked of the nodes themselves.

Extraction actors write their videos' chunks from whichever node they run on. Into an
object-store URL that works from any node; into a local path only if every node sees the same
folder (a shared filesystem mounted at the same path). `check_every_node_sees` writes a marker
file into the folder (or its nearest existing parent), runs a zero-CPU task pinned to each alive
node that looks for it, removes it, and refuses naming the nodes that did not see it.
"""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path

from clipreel.errors import ClipreelError

NODE_CHECK_SECONDS = 120.0  # a node that cannot start one small task in this time counts as not seeing


def look_for(marker: str) -> dict:
    """Run on a node: whether `marker` exists there, and which node and host looked."""
    import ray

    return {"node": ray.get_runtime_context().get_node_id(), "host": socket.gethostname(),
            "sees": os.path.exists(marker)}


def nodes_not_seeing(folder: Path) -> list[dict]:
    """The alive nodes of the connected Ray cluster on which a marker written into `folder` (or its
    nearest existing parent) is not visible: [{"node", "host", "sees"}], [] when every node sees it."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    marker = existing / f".clipreel-node-check-{uuid.uuid4().hex}"
    marker.write_text("clipreel extract: checking that every Ray node sees this folder\n")
    try:
        look = ray.remote(num_cpus=0, max_retries=0)(look_for)
        tasks = {
            node["NodeID"]: look.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
            ).remote(str(marker))
            for node in ray.nodes()
            if node["Alive"]
        }
        ready, _ = ray.wait(list(tasks.values()), num_returns=len(tasks), timeout=NODE_CHECK_SECONDS)
        answers = []
        for node_id, task in tasks.items():
            if task in ready:
                answers.append(ray.get(task))
            else:
                answers.append({"node": node_id, "host": "?", "sees": False})
                ray.cancel(task, force=True)
    finally:
        marker.unlink(missing_ok=True)
    return [answer for answer in answers if not answer["sees"]]


def check_every_node_sees(folder: Path) -> None:
    """Refuse a local store folder that some node of a multi-node Ray cluster cannot see."""
    import ray

    if sum(1 for node in ray.nodes() if node["Alive"]) < 2:
        return
    blind = nodes_not_seeing(folder)
    if blind:
        names = ", ".join(f"node {answer['node'][:12]} (host {answer['host']})" for answer in blind)
        raise ClipreelError(
            f"--out {folder} is a local path, and {len(blind)} node(s) of the Ray cluster cannot see it: {names}. "
            "Extraction actors write from every node. Give an object-store URL (--out s3://bucket/NAME.zarr, "
            "gs://…, az://…) or a folder on a filesystem that every node mounts at the same path."
        )
