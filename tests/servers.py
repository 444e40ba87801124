"""Real servers for the tests on free loopback ports: ``redis-server`` and an S3 endpoint.

Never a mock: the tiered backends are tested against the servers they will
meet in production.  Each :class:`RedisServer` runs in its own directory with
persistence off (``--save '' --appendonly no``), answers PING before it is
handed out, and can be killed, paused and restarted on the same port for the
outage tests.  Each :class:`MotoServer` is moto's standalone S3 server (``python
-m moto.server``), a real HTTP endpoint speaking the S3 API, started and
stopped the same way; it keeps its objects in memory (and its temp files in
its own directory), so a restarted one is empty.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

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


class ServerProcess:
    """A server process of the tests' own on a loopback port, to start, kill, pause and restart.

    A subclass says how to run it (:meth:`command`) and how to tell it answers
    (:meth:`answers`); its output goes to :attr:`log_path`.
    """

    name = "server"

    def __init__(self, directory: str) -> None:
        self.directory = directory
        os.makedirs(directory, exist_ok=True)
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> str:
        return os.path.join(self.directory, f"{self.name}.log")

    def command(self, port: int) -> list[str]:
        raise NotImplementedError

    def answers(self, port: int) -> bool:
        raise NotImplementedError

    def environment(self) -> dict[str, str] | None:
        return None

    def start(self):
        """Start on a free port (or the previous one, for a restart); wait until it answers."""
        for _ in range(5):  # another process may grab a free port before the server binds it
            port = self.port or free_port()
            if self._start_on(port):
                self.port = port
                return self
            if self.port:  # a restart must keep its port: wait for it to be free again
                time.sleep(0.2)
        raise RuntimeError(f"{self.name} did not start; see {self.log_path}")

    def _start_on(self, port: int) -> bool:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.command(port), stdout=log, stderr=subprocess.STDOUT, env=self.environment()
            )
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:  # exited: most likely the port was taken
                return False
            if self.answers(port):
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


class RedisServer(ServerProcess):
    """One private redis-server process; :attr:`url` is where to reach it."""

    name = "redis"

    def __init__(self, binary: str, directory: str) -> None:
        super().__init__(directory)
        self.binary = binary

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self, port: int) -> list[str]:
        return [
            self.binary,
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", self.directory,
            "--logfile", self.log_path,
            "--daemonize", "no",
        ]  # fmt: skip

    def answers(self, port: int) -> bool:
        return ping(port, timeout=0.5)

    def client(self):
        import redis

        return redis.Redis.from_url(self.url, socket_timeout=5)


class RedisClusterServer(RedisServer):
    """A one-node Redis Cluster: cluster mode, every slot on this node."""

    def command(self, port: int) -> list[str]:
        return [
            *super().command(port),
            "--cluster-enabled", "yes",
            "--cluster-config-file", "nodes.conf",
        ]  # fmt: skip

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


# -- S3 ---------------------------------------------------------------------------------

S3_CREDENTIALS = {
    "aws_access_key_id": "testing",
    "aws_secret_access_key": "testing",
    "region_name": "us-east-1",
}


def moto_installed() -> bool:
    return importlib.util.find_spec("moto") is not None


def http_ok(url: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return bool(response.status == 200)
    except (OSError, urllib.error.URLError):
        return False


class MotoServer(ServerProcess):
    """One moto S3 server process; :attr:`endpoint_url` is where to reach it.

    It keeps every object in memory: a killed one comes back empty.
    """

    name = "moto"

    def __init__(self, directory: str) -> None:
        super().__init__(directory)
        self._client = None
        self._client_port = 0

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def s3_arguments(self) -> dict:
        """boto3 client arguments for this server (moto takes any credentials)."""
        return {"endpoint_url": self.endpoint_url, **S3_CREDENTIALS}

    def command(self, port: int) -> list[str]:
        return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]

    def environment(self) -> dict[str, str]:
        return {**os.environ, "TMPDIR": self.directory}  # its spooled object files

    def answers(self, port: int) -> bool:
        return http_ok(f"http://127.0.0.1:{port}/moto-api/data.json", timeout=0.5)

    def stop(self) -> None:
        self._close_client()
        super().stop()

    def client(self):
        """A plain boto3 client, for making buckets and looking behind the tier (one per
        server and port, closed with the server: its pooled sockets must not linger)."""
        import boto3
        from botocore.config import Config

        if self._client is None or self._client_port != self.port:
            self._close_client()
            config = Config(signature_version="s3v4")
            self._client = boto3.client("s3", config=config, **self.s3_arguments)
            self._client_port = self.port
        return self._client

    def _close_client(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def reset(self) -> None:
        """Forget every bucket and object (moto's own API)."""
        request = urllib.request.Request(f"{self.endpoint_url}/moto-api/reset", method="POST")
        with urllib.request.urlopen(request, timeout=WAIT):
            pass
