"""Processes a test starts in their own session, ended by that recorded session id (never by name)."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from sweeps.launch import TRIAL_COMMANDS  # the launcher's commands that start or join Ray
from tests.conftest import REPO_ROOT


def pids_in_session(sid: int) -> list[int]:
    """The live processes of session ``sid``: a zombie (dead, waiting for its parent to read its exit status) runs
    nothing and cannot be killed, so it is not counted."""
    out = subprocess.run(["ps", "-e", "-o", "pid=,sid=,stat="], capture_output=True, text=True, check=True).stdout
    return [int(pid) for pid, s, stat in (line.split() for line in out.splitlines())
            if int(s) == sid and not stat.startswith("Z")]


class Sessions:
    """Start commands each in a new session; ``end_all`` kills every process of those sessions (Ray's workers
    leave the process group but stay in the session)."""

    def __init__(self, ray: SharedRay | None = None) -> None:
        self.procs: list[subprocess.Popen] = []
        self.ray = ray

    def start(self, args: list[str], **kwargs) -> subprocess.Popen:
        proc = subprocess.Popen(args, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, **kwargs)
        self.procs.append(proc)
        return proc

    def launch(self, command: list[str], args: tuple[str, ...], env: dict | None = None,
               own_ray: bool = False) -> subprocess.Popen:
        """A launcher (``command``: ``sweeps/launch.py`` or a test wrapper of it) with ``args``. A command that runs
        trials joins the session's shared Ray cluster, unless the test asks for Ray of its own (``own_ray``) or names
        a cluster itself (``--address``)."""
        extra: dict = {}
        if self.ray is not None and not own_ray and args and args[0] in TRIAL_COMMANDS and "--address" not in args:
            join_args, extra = self.ray.join()
            args = (args[0], *join_args, *args[1:])
        return self.start([*command, *args], cwd=REPO_ROOT, env={**os.environ, **extra, **(env or {})})

    def end(self, proc: subprocess.Popen) -> None:
        for _ in range(50):
            pids = pids_in_session(proc.pid)
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)
        proc.wait(timeout=30)

    def end_all(self) -> list[int]:
        """End everything; returns pids still alive in the recorded sessions (should be none)."""
        for proc in self.procs:
            self.end(proc)
        return [pid for proc in self.procs for pid in pids_in_session(proc.pid)]


# Ray rewrites 127.0.0.1 to the machine's interface address, which is not reachable here; 127.0.0.2 is loopback too
# and Ray takes it as given.
NODE_IP = "127.0.0.2"
RAY = str(Path(sys.executable).parent / "ray")
# Launcher arguments for exactly two trials at a time on the shared cluster, whatever its share of the CPUs (one core
# gives two half-CPU slots; more cores, still two).
TWO_AT_ONCE = ("--cpus-per-trial", "0.5", "--max-concurrent", "2")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def alive_nodes(address: str, env: dict) -> int:
    """How many nodes the cluster at ``address`` has alive (0 while it is not up yet)."""
    code = (f"import ray; ray.init(address={address!r}, _node_ip_address={NODE_IP!r}, log_to_driver=False); "
            "print(sum(n['Alive'] for n in ray.nodes()))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    return int(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else 0


def start_cluster(sessions: Sessions, nodes: int = 1, cpus_per_node: int | None = None,
                  timeout_s: float = 180) -> tuple[str, dict]:
    """A Ray cluster on this machine: a head and ``nodes - 1`` more nodes, each started with ``ray start --block`` in
    a session of its own. Token authentication (Ray's default for ``ray start``) with one token for every process.
    Returns the head's address and the variables a driver needs to join (its token)."""
    token = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    env = {**os.environ, **token}
    address = f"{NODE_IP}:{free_port()}"
    # no log monitor: launchers never stream their workers' logs (log_to_driver=False), and on a session-long
    # cluster it keeps rescanning every worker's log files
    node = [f"--node-ip-address={NODE_IP}", "--disable-usage-stats", "--block", "--include-log-monitor=false",
            *([f"--num-cpus={cpus_per_node}"] if cpus_per_node else [])]
    sessions.start([RAY, "start", "--head", f"--port={address.rsplit(':', 1)[1]}", "--include-dashboard=false",
                    *node], env=env)
    deadline = time.monotonic() + timeout_s
    for joined in range(1, nodes + 1):
        if joined > 1:
            sessions.start([RAY, "start", f"--address={address}", *node], env=env)
        while alive_nodes(address, env) < joined:
            assert time.monotonic() < deadline, f"node {joined} of the cluster at {address} did not start"
            time.sleep(1)
    return address, token


def cpu_share() -> int:
    """This test process's share of the machine's cores: all of them, or, under pytest-xdist, cores / workers (at
    least one). Each xdist worker's launcher tests run on a Ray cluster of their own; clusters that each claimed every
    core would run twice as many trials as there are cores, each in a Ray worker process of its own that imports torch
    and Ray (seconds of CPU) on a machine that has none to spare."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1)
    return max(1, (os.cpu_count() or 1) // workers)


class SharedRay:
    """One Ray cluster (one node, this test process's share of the CPUs: ``cpu_share``) for every launcher test of
    the session that can share one, started on first use: each launcher that starts its own Ray spends seconds
    starting and stopping it. A launcher joins it as a cluster user does (``--address``); tests that need Ray of their
    own (a two-node cluster, a driver whose kill must take its own Ray with it) start their own. A test that needs two
    trials running at once on it asks for them (``TWO_AT_ONCE``)."""

    def __init__(self) -> None:
        self._sessions = Sessions()
        self._joined: tuple[list[str], dict] | None = None

    def join(self) -> tuple[list[str], dict]:
        """The launcher arguments and the variables that join the cluster (starting it the first time)."""
        if self._joined is None:
            address, token = start_cluster(self._sessions, cpus_per_node=cpu_share())
            self._joined = (["--address", address, "--node-ip-address", NODE_IP], token)
        return self._joined

    def end(self) -> list[int]:
        return self._sessions.end_all()
