"""A real two-node Ray cluster for tests, inside a private network namespace (Ray binds every interface).

The calling thread moves into a new network namespace (``private_netns`` of the DICOM tests) and starts, from
there, ``ray start --head`` and a second ``ray start --address`` (a worker node), both ``--block`` so that the
test holds their processes. Every process of the cluster lives in that namespace, so the cluster's processes
are exactly the processes in it: :meth:`RayCluster.stop` ends them by id (SIGTERM to the two ``ray start``, then
SIGKILL to whatever is left in the namespace), and no Ray process is ever looked up by name.

Token authentication is on with a token made for the run and passed in the environment (nothing is written to
``~/.ray``); the driver processes get the same environment from :attr:`RayCluster.env`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "serve"))
from dicom_net import free_port, private_netns, wait_for

__all__ = ["RayCluster", "free_port", "private_netns", "ray_unavailable_reason", "wait_for"]

RAY_CLI = [sys.executable, "-c", "from ray.scripts.scripts import main; main()"]


def ray_unavailable_reason() -> str | None:
    """Why a Ray cluster cannot be started here (None if it can): Linux, root for ``unshare -n``, ``ip``, Ray."""
    if sys.platform != "linux":
        return f"needs Linux network namespaces, platform is {sys.platform}"
    if shutil.which("ip") is None or shutil.which("unshare") is None:
        return "ip or unshare not found on PATH"
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"'unshare -n true' failed (rc {probe.returncode}): {probe.stderr.strip()} (needs root)"
    if importlib.util.find_spec("ray") is None:
        return 'ray is not installed: pip install "diffseg[ray]"'
    return None


def _netns(pid: int | str) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/net")
    except OSError:
        return None


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@dataclass
class RayCluster:
    """``ray start --head`` plus one worker node, in the current (private) network namespace.

    Attributes:
        host_netns: the namespace the test came from (the cluster refuses to start there).
        cpus_per_node: logical CPUs each node declares.
        object_store_bytes: object store of each node.
    """

    host_netns: str
    cpus_per_node: int = 2
    object_store_bytes: int = 150_000_000
    port: int = 0
    temp_dir: Path | None = None
    env: dict[str, str] = field(default_factory=dict)
    processes: list[subprocess.Popen] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def netns(self) -> str:
        return os.readlink("/proc/thread-self/ns/net")

    def start(self, timeout: float = 120) -> RayCluster:
        if self.netns == self.host_netns:
            raise RuntimeError("refusing to start Ray outside a private network namespace (it binds every interface)")
        self.port = free_port()
        self.temp_dir = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: Ray's socket paths must fit
        self.env = dict(
            os.environ,
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN=secrets.token_hex(32),
            RAY_USAGE_STATS_ENABLED="0",
        )
        common = [
            "--node-ip-address=127.0.0.1",
            f"--num-cpus={self.cpus_per_node}",
            "--num-gpus=0",
            f"--object-store-memory={self.object_store_bytes}",
            "--disable-usage-stats",
            "--block",
        ]
        head = ["start", "--head", f"--port={self.port}", "--include-dashboard=false", f"--temp-dir={self.temp_dir}"]
        self._spawn([*RAY_CLI, *head, *common], "head")
        wait_for(lambda: self._listening(), timeout, f"the Ray head on port {self.port} (log {self.temp_dir}/head.log)")
        self._spawn([*RAY_CLI, "start", f"--address={self.address}", *common], "worker")
        wait_for(lambda: self._nodes() >= 2, timeout, f"the second Ray node (log {self.temp_dir}/worker.log)")
        return self

    def _spawn(self, cmd: list[str], name: str) -> None:
        with open(self.temp_dir / f"{name}.log", "wb") as log:
            self.processes.append(subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT))

    def _alive(self) -> None:
        for p in self.processes:
            if p.poll() is not None:
                logs = "".join(
                    (self.temp_dir / f"{n}.log").read_text()[-1500:]
                    for n in ("head", "worker")
                    if (self.temp_dir / f"{n}.log").exists()
                )
                raise RuntimeError(f"ray start exited with {p.returncode}: {logs}")

    def _listening(self) -> bool:
        import socket

        self._alive()
        with socket.socket() as s:
            s.settimeout(0.5)
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def _nodes(self) -> int:
        """Raylets in the namespace (one per node)."""
        self._alive()
        return sum(1 for pid in self.pids() if "/raylet/raylet " in _cmdline(pid))

    def pids(self) -> list[int]:
        """Every process in this cluster's network namespace except the test itself."""
        mine, own = self.netns, os.getpid()
        return [int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) != own and _netns(p) == mine]

    def actor_pids(self, class_name: str) -> list[int]:
        """Ray worker processes of the cluster running actors of ``class_name`` (by their process title)."""
        return [pid for pid in self.pids() if _cmdline(pid).startswith(f"ray::MapWorker(MapBatches({class_name}))")]

    def kill(self, pid: int) -> None:
        """SIGKILL one of the cluster's processes (refused for a process outside its namespace)."""
        if _netns(pid) != self.netns:
            raise RuntimeError(f"process {pid} is not in the cluster's network namespace")
        os.kill(pid, signal.SIGKILL)

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM to both ``ray start``, then SIGKILL what is left in the namespace; waits for all to go."""
        for p in reversed(self.processes):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(p.poll() is None for p in self.processes):
            time.sleep(0.2)
        for _ in range(50):
            left = self.pids()
            if not left:
                break
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)
        for p in self.processes:
            if p.poll() is None:
                p.wait(timeout=10)
        if self.temp_dir is not None:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
