"""Pub/sub coherence: a set or delete on one host drops the local copies on the others.

A writer publishes the keys it changed on a Redis channel, after the remote
write and before its local one.  Each process runs one :class:`Listener` per
Redis server and channel: a daemon thread, shared by every tiered backend of
the process, that hands what it hears to them, and they drop their copies.

**Trust.** A message missed is a stale copy kept, so the listener says which
local copies it vouches for: those written at or after :attr:`Listener.trusted_since`,
the moment its current subscription was confirmed.  While it is not subscribed
(starting, just after a fork, after its connection dropped) it vouches for
none, and after a reconnection nothing written before it is trusted again --
the way dogpile's hard invalidation works, by time, never by deleting a cache
that may hold gigabytes.  A dead connection is noticed by pings: within
``SILENCE_LIMIT`` seconds.

**Races.** A reader that copies a remote value into its local tier may have
read it just before another host's write.  The listener counts what it hears
(:attr:`Listener.generation`); the reader notes the count before its remote
read and, after its local write, drops the copy if :meth:`Listener.changed_since`
says the key was invalidated (or the channel dropped) meanwhile.  A writer
counts its own write at once, after the remote write, so the listener skips the
messages of its own process; and after its local write it drops its copy in the
same way, if another write of the key was heard after its remote write.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import secrets
import threading
import time
import types
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

from . import forking

log = logging.getLogger(__name__)

PING_INTERVAL = 1.0  # seconds between pings on a quiet channel
SILENCE_LIMIT = 3.5  # no message nor pong for this long: the connection is dead
RECONNECT_MIN = 0.1
RECONNECT_MAX = 5.0
RECENT_KEYS = 65536  # invalidated keys remembered for racing readers; then a floor


class Subscriber(Protocol):
    """What a listener hands messages to (a tiered backend)."""

    origin: str  # its local tier, as messages name it

    def invalidated(self, origin: str, entries: Sequence[tuple[str, str | None]]) -> None: ...

    def region_invalidated(self, soft_ns: int, hard_ns: int) -> None: ...

    def subscribed(self) -> None: ...


def value_digest(value: bytes) -> str:
    return hashlib.blake2b(value, digest_size=16).hexdigest()


_process_token = secrets.token_hex(8)  # tells this process's own messages apart


@forking.call_in_children
def _new_process_token() -> None:
    global _process_token
    _process_token = secrets.token_hex(8)


def encode(origin: str, entries: Mapping[str, bytes | None]) -> bytes:
    """A message: who wrote (``origin``: the host's local tier; and the process), and
    each key with its new value's digest (``None`` for a delete)."""
    items = [
        [key, None if value is None else value_digest(value)] for key, value in entries.items()
    ]
    message = {"o": origin, "p": _process_token, "k": items}
    return json.dumps(message, separators=(",", ":")).encode()


def decode(data: Any) -> tuple[str, str, list[tuple[str, str | None]]] | None:
    """``(origin, process, [(key, digest or None), ...])``, or None for anything else."""
    try:
        message = json.loads(data)
        origin, process, items = message["o"], message["p"], message["k"]
        entries = [(key, digest) for key, digest in items]
    except (ValueError, TypeError, KeyError):
        return None
    if not isinstance(origin, str) or not all(
        isinstance(key, str) and (digest is None or isinstance(digest, str))
        for key, digest in entries
    ):
        return None
    return origin, process, entries


def encode_region(soft_ns: int, hard_ns: int) -> bytes:
    """A region invalidation: the SharedInvalidation times of the regions on this
    channel (see tierinvalidation.py)."""
    message = {"p": _process_token, "i": [soft_ns, hard_ns]}
    return json.dumps(message, separators=(",", ":")).encode()


def decode_region(data: Any) -> tuple[str, int, int] | None:
    """``(process, soft_ns, hard_ns)``, or None for anything else."""
    try:
        message = json.loads(data)
        process, (soft_ns, hard_ns) = message["p"], message["i"]
    except (ValueError, TypeError, KeyError):
        return None
    if not all(
        isinstance(ns, int) and not isinstance(ns, bool) and 0 <= ns < 2**63
        for ns in (soft_ns, hard_ns)
    ):
        return None
    return process, soft_ns, hard_ns


class Listener:
    """This process's subscription to one channel of one Redis server.

    Get it with :meth:`for_client`; it runs while a subscriber is registered.
    """

    _instances: dict[tuple[Any, ...], Listener] = {}
    _instances_guard = threading.Lock()

    @classmethod
    def for_client(cls, client: Any, channel: str) -> Listener:
        key = (*_address(client), channel)
        with cls._instances_guard:
            listener = cls._instances.get(key)
            if listener is None:
                listener = cls._instances[key] = cls(client, channel)
            return listener

    def __init__(self, client: Any, channel: str) -> None:
        self.client = client
        self.channel = channel
        self._subscribers: weakref.WeakSet[Any] = weakref.WeakSet()
        self._reset()
        forking.reset_in_children(self)

    def _reset(self) -> None:
        """Fresh state: at start, and in a forked child (the thread did not survive)."""
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.trusted_since = math.inf
        self.generation = getattr(self, "generation", 0) + 1
        self._floor = self.generation
        self._recent: dict[str, int] = {}
        self._failures = 0
        self.connected = False
        self.subscriptions = 0  # confirmed subscriptions: 1 + reconnections

    _reset_after_fork = _reset  # see forking.py

    @classmethod
    def _new_instances_guard(cls) -> None:
        cls._instances_guard = threading.Lock()

    # -- used by tiered backends ----------------------------------------------------

    def register(self, subscriber: Subscriber) -> None:
        with self._lock:
            self._subscribers.add(subscriber)
        self.ensure_running()

    def ensure_running(self) -> None:
        """Start the thread if this process has none (first use, or after a fork)."""
        if self._thread is not None:
            return
        with self._lock:
            if self._thread is None and len(self._subscribers):
                self._thread = threading.Thread(
                    target=self._run,
                    name=f"dogpile_fsbackend listener {self.channel}",
                    daemon=True,
                )
                self._thread.start()

    def trusts(self, written: float) -> bool:
        """True if a local copy written at ``written`` (time.time()) is vouched for."""
        return written >= self.trusted_since

    def changed_since(self, key: str, generation: int) -> bool:
        """True if ``key`` may have been invalidated after ``generation`` was read."""
        return self._floor > generation or self._recent.get(key, -1) > generation

    def wait_connected(self, timeout: float) -> bool:
        """Wait (bounded) for a confirmed subscription; for tests and benchmarks."""
        deadline = time.monotonic() + timeout
        while not self.connected:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return True

    # -- the thread -----------------------------------------------------------------

    def _run(self) -> None:
        delay = RECONNECT_MIN
        while self._keep_running():
            started = self.subscriptions
            try:
                self._listen()
            except Exception as exc:  # a dropped connection, or anything else: never die
                self._gap()
                self._failures += 1
                level = logging.WARNING if self._failures == 1 else logging.DEBUG
                log.log(
                    level,
                    "invalidation channel %r dropped (%s: %s); local copies written before "
                    "it reconnects are not trusted",
                    self.channel,
                    type(exc).__name__,
                    exc,
                )
            if self.subscriptions > started:
                delay = RECONNECT_MIN  # it worked for a while: reconnect quickly
            time.sleep(delay)
            delay = min(delay * 2, RECONNECT_MAX)

    def _keep_running(self) -> bool:
        with self._lock:
            if len(self._subscribers):
                return True
            self._thread = None
            return False

    def _listen(self) -> None:
        pid = os.getpid()
        pubsub = self.client.pubsub()

        def on_connect(pubsub: Any, connection: Any) -> None:
            # redis-py reconnects and resubscribes by itself: messages may have been lost.
            self._gap()
            type(pubsub).on_connect(pubsub, connection)

        # redis-py keeps a weak reference to a bound method: make this one an attribute.
        pubsub.on_connect = types.MethodType(on_connect, pubsub)
        try:
            pubsub.subscribe(self.channel)
            heard = pinged = time.monotonic()
            while len(self._subscribers):
                message = pubsub.get_message(timeout=PING_INTERVAL)
                now = time.monotonic()
                if message is not None:
                    heard = now
                    self._handle(message)
                elif now - heard > SILENCE_LIMIT:
                    raise ConnectionError(f"no answer to pings for {now - heard:.1f} s")
                if now - pinged >= PING_INTERVAL:
                    pubsub.ping()
                    pinged = now
        finally:
            self._gap()
            if os.getpid() == pid:
                pubsub.close()

    def _handle(self, message: Mapping[str, Any]) -> None:
        kind = message.get("type")
        if kind == "subscribe":
            with self._lock:
                # A read begun before this confirmation may predate the subscription
                # on the server: as after a gap, its copy is dropped (changed_since).
                self.generation += 1
                self._floor = self.generation
                self.trusted_since = time.time()
                self.connected = True
                self.subscriptions += 1
                self._failures = 0
            self._tell_subscribers("catch up after subscribing", lambda s: s.subscribed())
        elif kind == "message":
            data = message.get("data")
            decoded = decode(data)
            if decoded is not None:
                self._dispatch(*decoded)
                return
            region = decode_region(data)
            if region is None:
                log.debug("ignoring a foreign message on %r: %.100r", self.channel, message)
                return
            process, soft_ns, hard_ns = region
            if process != _process_token:  # the invalidating process merged it already
                self._tell_subscribers(
                    "merge a region invalidation",
                    lambda s: s.region_invalidated(soft_ns, hard_ns),
                )

    def _tell_subscribers(self, what: str, call: Callable[[Subscriber], None]) -> None:
        for subscriber in list(self._subscribers):
            try:
                call(subscriber)
            except Exception:  # never the listener's death
                log.exception("a tiered backend could not %s", what)

    def _dispatch(
        self, origin: str, process: str, entries: Sequence[tuple[str, str | None]]
    ) -> None:
        own = process == _process_token  # a write of this process, remembered as it was made
        if not own:
            self.remember(key for key, _ in entries)  # before dropping: see changed_since
        for subscriber in list(self._subscribers):
            if own and subscriber.origin == origin:
                continue  # the writer's own tier writes its copy itself
            try:
                subscriber.invalidated(origin, entries)
            except Exception:
                # A copy we could not drop must not stay trusted.
                log.exception("could not drop local copies for %d keys", len(entries))
                with self._lock:
                    self.trusted_since = max(self.trusted_since, time.time())

    def remember(self, keys: Iterable[str], since: int | None = None) -> tuple[int, set[str]]:
        """Count an invalidation of ``keys``: racing readers will drop their copies.

        A writer of this process calls it after its remote write, so that the
        readers of its own process need not wait for the message to come back.
        It passes as ``since`` the generation it read before that write, and
        gets back the generation of this invalidation and the keys that were
        invalidated in between; after its local write it drops the copies of
        those, and of the keys :meth:`changed_since` this generation.
        """
        keys = list(keys)
        with self._lock:
            changed = set() if since is None else {k for k in keys if self.changed_since(k, since)}
            self.generation += 1
            if len(self._recent) > RECENT_KEYS:
                self._recent.clear()
                self._floor = self.generation
            for key in keys:
                self._recent[key] = self.generation
            return self.generation, changed

    def _gap(self) -> None:
        with self._lock:
            self.generation += 1
            self._floor = self.generation
            self.trusted_since = math.inf
            self.connected = False


forking.call_in_children(Listener._new_instances_guard)


def _address(client: Any) -> tuple[Any, ...]:
    """Which server a client talks to: listeners are shared per server and channel."""
    pool = client.connection_pool
    kwargs = pool.connection_kwargs
    names = ("host", "port", "path", "db", "username")
    return (*(kwargs.get(name) for name in names), getattr(pool, "service_name", None))


def default_channel(client: Any) -> str:
    """Channels are global to a Redis server: one per database, like the keys."""
    return f"dogpile_fsbackend:invalidate:{client.connection_pool.connection_kwargs.get('db', 0)}"
