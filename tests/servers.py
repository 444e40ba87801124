"""Real servers for the tests: a private ``redis-server`` on a free loopback port.

Never a mock: the tiered backend is tested against the server it will meet in
production.  Each :class:`RedisServer` runs in its own directory with
persistence off (``--save '' --appendonly no``), answers PING before it is
handed out, and can be killed, paused and restarted on the same port for the
outage tests.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time

WAIT = 30.0  # seconds a server may take to start or stop

SEARCH_PATH = os.pathsep.join(
    [os.environ.get("PATH", ""), "/usr/bin", "/usr/sbin", "/usr/local/bin"]
)


def redis_server_binary() -> str | None:
    return shutil.which("redis-server", path=SEARCH_PATH)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def ping(port: int, timeout: float = 1.0) -> bool:
    """True if a Redis server answers PING on ``port`` (plain RESP, no client library)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One private redis-server process; :attr:`url` is where to reach it."""

    def __init__(self, binary: str, directory: str, extra: tuple[str, ...] = ()) -> None:
        self.binary = binary
        self.directory = directory
        self.extra = extra  # more command-line options
        os.makedirs(directory, exist_ok=True)
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        """Start on a free port (or the previous one, for a restart); wait for PING."""
        for _ in range(5):  # another process may grab a free port before the server binds it
            port = self.port or free_port()
            if self._start_on(port):
                self.port = port
                return self
            if self.port:  # a restart must keep its port: wait for it to be free again
                time.sleep(0.2)
        raise RuntimeError(f"redis-server did not start; see {self.log_path}")

    @property
    def log_path(self) -> str:
        return os.path.join(self.directory, "redis.log")

    def _start_on(self, port: int) -> bool:
        command = [
            self.binary,
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", self.directory,
            "--logfile", self.log_path,
            "--daemonize", "no",
            *self.extra,
        ]  # fmt: skip
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:  # exited: most likely the port was taken
                return False
            if ping(port, timeout=0.5):
                return True
            time.sleep(0.01)
        self.process.kill()
        self.process.wait(WAIT)
        return False

    def kill(self) -> None:
        """SIGKILL: an outage with connections refused from now on."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(WAIT)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(WAIT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(WAIT)

    def restart(self) -> None:
        self.kill()
        self.start()

    @contextlib.contextmanager
    def paused(self):
        """SIGSTOP: a hung server (connections accepted by the kernel, never answered)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)
        try:
            yield
        finally:
            self.process.send_signal(signal.SIGCONT)

    def client(self):
        import redis

        return redis.Redis.from_url(self.url, socket_timeout=5)


class RedisClusterServer(RedisServer):
    """A one-node Redis Cluster: cluster mode, every slot on this node."""

    def __init__(self, binary: str, directory: str) -> None:
        super().__init__(
            binary,
            directory,
            ("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"),
        )

    def start(self) -> RedisClusterServer:
        super().start()
        client = self.client()
        client.execute_command("CLUSTER", "ADDSLOTSRANGE", "0", "16383")
        deadline = time.monotonic() + WAIT
        while client.cluster("info")["cluster_state"] != "ok":
            if time.monotonic() > deadline:
                raise RuntimeError(f"the cluster did not come up; see {self.log_path}")
            time.sleep(0.01)
        client.close()
        return self
