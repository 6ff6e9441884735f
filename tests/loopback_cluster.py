"""A real two-node Ray cluster on this machine, for the tests that need one (the ``cluster`` fixture in
conftest.py starts it once per session).

The cluster is two ``ray start`` processes (a head with the dashboard / job server, and a worker node
that joins it), each a separate raylet on this host, marked with the custom resources ``head`` and
``worker``; the worker node declares one (logical) GPU. Jobs go in the way they would on a real cluster:
``ray job submit --working-dir`` with token authentication (``RAY_AUTH_MODE=token``), or a driver started
with ``--address``. The tests' own learner and receiver modules are on the nodes' ``PYTHONPATH``, as a
user's code would be installed on theirs.

Isolation from any other Ray on the machine (e.g. a session-wide ``ray.init()`` of other tests, or a
developer's own ``ray start``):

* every port that Ray would otherwise take at a fixed default (GCS 6379, dashboard 8265, client
  server 10001, dashboard agent 52365, workers 10002-19999) is a free port chosen here, or random;
* both nodes use a temp dir of their own (so the ``ray_current_cluster`` file, which ``ray.init()``
  without an address would follow, never lands in /tmp/ray);
* the token is a fresh one in ``RAY_AUTH_TOKEN``, so ~/.ray/auth_token is neither read nor created;
* the test process never imports Ray's driver state: everything runs in subprocesses.

Cleanup never uses ``ray stop``, which stops every Ray on the machine. Each ``ray start`` runs in a
new session (``start_new_session=True``), so its pid is the process group of every daemon it
spawns (GCS, raylet, dashboard, agents, monitor). Ray's worker processes (actors, the job
supervisor, the job's driver) move to groups of their own, but they are children of a raylet. At
teardown the fixture takes the members of those groups plus all their descendants, sends SIGTERM,
waits, then SIGKILLs what is left (the GCS ignores SIGTERM for a while), and checks that nothing
of it survives. It does this in a ``finally``, so a failed start is cleaned up too.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

RAY = Path(sys.executable).with_name("ray")
TESTS = Path(__file__).resolve().parent
START_TIMEOUT = 120
TERM_GRACE = 5


def free_ports(n: int) -> list[int]:
    """n distinct ports that are free now (held open together so they differ)."""
    with ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("", 0))
        return [s.getsockname()[1] for s in socks]


def tail(text: str, n: int = 60) -> str:
    return "\n".join(text.splitlines()[-n:])


@dataclass
class LocalCluster:
    """Two raylets on this host, started and stopped by the tests only."""

    temp_dir: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="flrc-", dir="/tmp"))
    pgids: list[int] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    gcs_address: str = ""
    dashboard_url: str = ""
    head_id: str = ""
    worker_id: str = ""

    def start(self) -> None:
        # Short temp dir (/tmp/flrc-XXXX): Ray's unix sockets live under it, and paths are limited to 107 bytes.
        gcs, dashboard, client, head_agent, worker_agent = free_ports(5)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_")) and k != "WANDB_API_KEY"}
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32), RAY_USAGE_STATS_ENABLED="0")
        # The tests' own learners and receivers, installed on both nodes as a user's would be.
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS), env.get("PYTHONPATH")) if p)
        self.env = env
        self.gcs_address = f"127.0.0.1:{gcs}"
        self.dashboard_url = f"http://127.0.0.1:{dashboard}"
        common = [
            "--num-cpus",
            "2",
            "--temp-dir",
            self.temp_dir,
            "--min-worker-port",
            "0",
            "--max-worker-port",
            "0",
            "--object-store-memory",
            str(300 * 1024**2),
            "--disable-usage-stats",
        ]
        self._ray_start(
            [
                "--head",
                "--port",
                str(gcs),
                "--resources",
                '{"head": 1}',
                "--include-dashboard",
                "true",
                "--dashboard-host",
                "127.0.0.1",
                "--dashboard-port",
                str(dashboard),
                "--ray-client-server-port",
                str(client),
                "--dashboard-agent-listen-port",
                str(head_agent),
                *common,
            ]
        )
        # One log monitor per host is enough (Ray's own multi-node test clusters do the same).
        # The worker node declares one (logical) GPU, so fractional-GPU placement can be checked here.
        self._ray_start(
            [
                "--address",
                self.gcs_address,
                "--resources",
                '{"worker": 1}',
                "--num-gpus",
                "1",
                "--dashboard-agent-listen-port",
                str(worker_agent),
                "--include-log-monitor",
                "false",
                *common,
            ]
        )
        nodes = self._wait_for_nodes(2)
        self.head_id = next(n["node_id"] for n in nodes if n["is_head_node"])
        self.worker_id = next(n["node_id"] for n in nodes if "worker" in n["resources_total"])

    def _ray_start(self, args: list[str]) -> None:
        proc = subprocess.Popen(
            [str(RAY), "start", *args],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.pgids.append(proc.pid)  # before waiting: a start that hangs or fails is still cleaned up
        try:
            out, _ = proc.communicate(timeout=START_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
            raise RuntimeError(f"ray start {args[0]} took over {START_TIMEOUT} s:\n{tail(out)}") from None
        if proc.returncode != 0:
            raise RuntimeError(f"ray start {args[0]} failed ({proc.returncode}):\n{tail(out)}")

    def ray(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run the ray CLI against this cluster's environment (token included)."""
        return subprocess.run([str(RAY), *args], env=self.env, capture_output=True, text=True, timeout=timeout)

    def nodes(self) -> list[dict[str, Any]]:
        """`ray list nodes` of this cluster."""
        res = self.ray("list", "nodes", "--address", self.dashboard_url, "--format", "json")
        if res.returncode != 0:
            raise RuntimeError(f"ray list nodes failed:\n{tail(res.stdout + res.stderr)}")
        return json.loads(res.stdout)

    def _wait_for_nodes(self, n: int) -> list[dict[str, Any]]:
        deadline, last = time.monotonic() + START_TIMEOUT, None
        while time.monotonic() < deadline:
            try:
                alive = [x for x in self.nodes() if x["state"] == "ALIVE"]
                if len(alive) >= n:
                    return alive
                last = alive
            except (RuntimeError, ValueError, subprocess.TimeoutExpired) as exc:
                last = exc
            time.sleep(1)
        raise RuntimeError(f"the cluster did not reach {n} alive nodes in {START_TIMEOUT} s; last: {last}")

    def processes(self, node: int | None = None) -> list[psutil.Process]:
        """Every live process of this cluster (or of one node: 0 the head, 1 the worker): members of the
        `ray start` groups and their descendants."""
        groups = self.pgids if node is None else [self.pgids[node]]
        found: dict[int, psutil.Process] = {}
        for proc in psutil.process_iter():
            try:
                if os.getpgid(proc.pid) in groups:
                    found[proc.pid] = proc
                    for child in proc.children(recursive=True):
                        found[child.pid] = child
            except (psutil.Error, ProcessLookupError):
                continue
        return [p for pid, p in found.items() if pid != os.getpid()]

    def stop(self) -> list[str]:
        """SIGTERM, wait, SIGKILL; returns what survived (should be nothing)."""
        for sig, wait in ((signal.SIGTERM, TERM_GRACE), (signal.SIGKILL, 5)):
            procs = self.processes()
            for p in procs:
                try:
                    p.send_signal(sig)
                except psutil.Error:
                    pass
            psutil.wait_procs(procs, timeout=wait)
        survivors = []
        for p in self.processes():
            try:
                survivors.append(f"{p.pid} {p.name()}")
            except psutil.Error:
                pass
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        return survivors
