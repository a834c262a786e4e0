"""A real two-node Ray cluster on this machine for tests: `ray start --head` and a second
`ray start --address …` node with its own resources, each in its own session (so the test ends
exactly the processes it started), with their own temporary folder and ports, never touching
any other Ray on the machine. The second node can run in a mount namespace of its own in which
one folder is hidden under an empty tmpfs: a node that really does not see that folder."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from sessions import kill_session

RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]


def can_hide_folders() -> bool:
    """Whether this process may make mount namespaces (root, or unprivileged user namespaces)."""
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-m", "--propagation", "private", "true"], capture_output=True)
    return probe.returncode == 0


# A cluster on loopback needs no token authentication (which Ray turns on whenever a token file
# exists in the home folder, for the nodes but not for a joining `ray.init`).
LOOPBACK_ONLY = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
# Ray replaces "127.0.0.1" (and "localhost") by the machine's network address; other loopback
# addresses it keeps. So each node gets one of its own, like two hosts on one network.
HEAD_IP, SECOND_IP = "127.0.0.2", "127.0.0.3"


def node_environment() -> dict[str, str]:
    """This process's environment without any storage credentials (the nodes must be handed them),
    for the nodes and every driver that joins the cluster."""
    kept = {name: value for name, value in os.environ.items() if not name.startswith(("AWS_", "FSSPEC_", "RAY_ADDRESS"))}
    return kept | LOOPBACK_ONLY


@dataclass
class TwoNodeCluster:
    address: str
    head_node: str  # Ray node ids
    second_node: str
    hidden_from_second: Path | None  # a folder the second node cannot see (None: not possible here)
    starters: list[subprocess.Popen] = field(default_factory=list)  # the `ray start --block` processes

    @property
    def sessions(self) -> list[int]:
        """Each node's session: its `ray start`, GCS, raylet and workers."""
        return [starter.pid for starter in self.starters]

    temp_dir: Path | None = None  # the nodes' Ray folders (short: Ray's socket paths must fit 107 bytes)

    def stop(self) -> None:
        for session in self.sessions:
            kill_session(session)
        for starter in self.starters:
            starter.wait(timeout=60)
        if self.temp_dir is not None:
            shutil.rmtree(self.temp_dir, ignore_errors=True)


def _start(command: list[str], root: Path, name: str, environment: dict[str, str]) -> subprocess.Popen:
    log = open(root / f"{name}.log", "w")
    return subprocess.Popen(command, env=environment, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, cwd=root)


def _node_args(temp_dir: Path, cpus: int, resource: str, ip: str) -> list[str]:
    # Workers' ports below the kernel's ephemeral range (32768 up), where free_port() finds the others.
    low = 20000 + (os.getpid() * 7 + time.time_ns()) % 12000
    return [
        "--num-cpus", str(cpus), "--resources", json.dumps({resource: 1}), "--object-store-memory", str(300 * 2**20),
        "--node-ip-address", ip, "--temp-dir", str(temp_dir), "--disable-usage-stats",
        "--node-manager-port", str(free_port()), "--object-manager-port", str(free_port()),
        "--min-worker-port", str(low), "--max-worker-port", str(low + 199),
        "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
        "--metrics-export-port", str(free_port()), "--runtime-env-agent-port", str(free_port()),
        "--block",
    ]


def start_two_node_cluster(root: Path, hide: Path | None = None, cpus: int = 2) -> TwoNodeCluster:
    """Head (resource node_a) and a second node (node_b), `cpus` logical CPUs each; the second
    node cannot see `hide` when given and the machine allows mount namespaces."""
    root.mkdir(parents=True, exist_ok=True)
    temp_dir = Path(tempfile.mkdtemp(prefix="clipreel-ray-"))
    port = free_port()
    address = f"{HEAD_IP}:{port}"
    head = _start([RAY, "start", "--head", "--port", str(port), "--include-dashboard", "false",
                   *_node_args(temp_dir / "head", cpus, "node_a", HEAD_IP)], root, "head", node_environment())
    cluster = TwoNodeCluster(address, "", "", None, [head], temp_dir)
    try:
        _wait_for_nodes(address, 1, head)
        second_args = [RAY, "start", "--address", address, *_node_args(temp_dir / "second", cpus, "node_b", SECOND_IP)]
        if hide is not None and can_hide_folders():
            hide.mkdir(parents=True, exist_ok=True)
            script = 'mount -t tmpfs clipreel-hidden "$1" && shift && exec "$@"'
            second_args = ["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh", str(hide),
                           *second_args]
            cluster.hidden_from_second = hide
        second = _start(second_args, root, "second", node_environment())
        cluster.starters.append(second)
        nodes = _wait_for_nodes(address, 2, second)
        cluster.head_node = next(node["NodeID"] for node in nodes if "node_a" in node["Resources"])
        cluster.second_node = next(node["NodeID"] for node in nodes if "node_b" in node["Resources"])
    except BaseException:
        cluster.stop()
        raise
    return cluster


_LIST_NODES = """
import json, sys, ray
ray.init(address=sys.argv[1], log_to_driver=False, configure_logging=False)
print(json.dumps([{"NodeID": n["NodeID"], "Resources": n["Resources"]} for n in ray.nodes() if n["Alive"]]))
"""


def _wait_for_nodes(address: str, count: int, process: subprocess.Popen, timeout: float = 120.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"ray start exited with {process.returncode}; see its log")
        try:
            listed = subprocess.run([sys.executable, "-c", _LIST_NODES, address], env=node_environment(),
                                    capture_output=True, text=True, timeout=60)
        except subprocess.TimeoutExpired:
            continue
        if listed.returncode == 0:
            nodes = json.loads(listed.stdout.strip().splitlines()[-1])
            if len(nodes) >= count:
                return nodes
        time.sleep(1.0)
    raise RuntimeError(f"the Ray cluster at {address} did not reach {count} nodes in {timeout:.0f} s")
