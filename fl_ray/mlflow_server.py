"""LocalMlflowServer: a real ``mlflow server`` process on 127.0.0.1, for benchmarks, tests and demos.

It serves a sqlite store and an artifact folder under ``root``, can be stopped and started again on
the same store and port (to play a tracking-server outage), and counts the HTTP requests it served
(from its access log). It runs without MLflow's job-execution processes (used for GenAI jobs, not
for tracking), which would otherwise take seconds of CPU at every start.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalMlflowServer:
    """``mlflow server`` on a free loopback port with a sqlite backend under ``root``, with ``workers``
    worker processes (None: MLflow's default)."""

    def __init__(self, root: Path, port: int | None = None, workers: int | None = 1) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.workers = workers
        self.port = port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log_path = self.root / "server.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120.0) -> LocalMlflowServer:
        """Start the server and wait until it answers /health."""
        cmd = [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--backend-store-uri",
            f"sqlite:///{self.root / 'mlflow.db'}",
            "--artifacts-destination",
            str(self.root / "artifacts"),
        ]
        if self.workers is not None:
            cmd += ["--workers", str(self.workers)]
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {self.log_path.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as resp:
                    if resp.status == 200:
                        return self
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"mlflow server did not answer {self.uri}/health within {timeout:g} s")

    def stop(self) -> None:
        """Stop the server and every process it started (safe to call twice)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None

    def requests_served(self) -> int:
        """HTTP requests logged so far (health checks included)."""
        if not self.log_path.exists():
            return 0
        return sum(
            1 for line in self.log_path.read_text(errors="replace").splitlines() if '" 2' in line and "HTTP/1.1" in line
        )

    def __enter__(self) -> LocalMlflowServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
