"""What a tier needs to know about dogpile's Redis backends, and the ``redis`` extra.

dogpile's ``dogpile.cache.redis`` (and ``redis_sentinel``, ``redis_cluster``)
pass their arguments to redis-py, whose defaults suit a cache that must answer:
a 5 s socket timeout and ten retries with growing waits on a failed connection.
A tier degrades instead, so it gives a Redis remote bounded timeouts and a
single immediate retry unless the user chose their own, and warns about the
settings known to bite (see :func:`pitfalls`).

Nothing here imports ``redis`` before a Redis remote is configured.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from dogpile.cache.api import CacheBackend
from dogpile.cache.backends import redis as dogpile_redis
from dogpile.cache.backends.redis import (  # dogpile defers its own ``import redis``
    RedisBackend,
    RedisSentinelBackend,
)
from dogpile.cache.proxy import ProxyBackend

from .remote import require_extra

if TYPE_CHECKING:
    import redis

# dogpile.cache.redis_cluster arrived in dogpile.cache 1.3.2; before it, no remote is one.
_CLUSTER_CLASSES: tuple[type[CacheBackend], ...] = tuple(
    filter(None, [getattr(dogpile_redis, "RedisClusterBackend", None)])
)

CONNECT_TIMEOUT = 0.5  # seconds; a TCP handshake on a LAN takes well under 1 ms
SOCKET_TIMEOUT = 1.0  # per read or write, not per value
LOCK_SLEEP_DEFAULT = 0.1  # dogpile's default lock_sleep


def require_redis(feature: str) -> Any:
    """The ``redis`` module, or MissingExtraError saying how to install it."""
    return require_extra("redis", "redis", feature)


def is_redis_class(backend_class: type[CacheBackend]) -> bool:
    return issubclass(backend_class, RedisBackend)


def innermost(backend: CacheBackend) -> CacheBackend:
    """The backend under any ProxyBackends wrapped around it."""
    while isinstance(backend, ProxyBackend):
        backend = backend.proxied
    return backend


def with_defaults(
    backend_class: type[CacheBackend], arguments: Mapping[str, Any]
) -> dict[str, Any]:
    """A copy of a remote's arguments with a tier's defaults under the user's own.

    For dogpile's Redis backends: bounded connect and socket timeouts, one
    immediate retry (a pooled connection that a restarted Redis closed is
    replaced at once; a dead Redis fails fast), and ``thread_local_lock=False``
    (dogpile warns without it, and an async creator releases from another thread).
    """
    found = dict(arguments)
    if not is_redis_class(backend_class):
        return found
    require_redis(f"the remote {backend_class.__name__}")
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    found.setdefault("thread_local_lock", False)
    if "connection_pool" in found:
        return found  # the pool carries its own settings (see pitfalls)
    found.setdefault("socket_connect_timeout", CONNECT_TIMEOUT)
    found.setdefault("socket_timeout", SOCKET_TIMEOUT)
    connection_kwargs = dict(found.get("connection_kwargs") or {})
    connection_kwargs.setdefault("retry", Retry(NoBackoff(), 1))
    if issubclass(backend_class, _CLUSTER_CLASSES):
        # dogpile's cluster backend hands redis-py its connection_kwargs only.
        for name in ("socket_connect_timeout", "socket_timeout"):
            connection_kwargs.setdefault(name, found[name])
    found["connection_kwargs"] = connection_kwargs
    return found


def client_of(backend: CacheBackend) -> redis.Redis | None:
    """The redis-py client that writes for a dogpile Redis backend (or None)."""
    base = innermost(backend)
    if not isinstance(base, RedisBackend):
        return None
    client: redis.Redis = base.writer_client
    return client


def supports_pubsub(backend: CacheBackend) -> bool:
    base = innermost(backend)
    return isinstance(base, RedisBackend) and not isinstance(base, _CLUSTER_CLASSES)


def error_types(backend: CacheBackend) -> tuple[type[BaseException], ...]:
    """Exceptions from ``backend`` that mean "the remote is out", not a bug.

    For Redis: connection failures and timeouts, and error replies (out of
    memory, read-only replica, loading, no permission); for a cluster, its
    client's own errors too.  OSError always.
    """
    base = innermost(backend)
    if not isinstance(base, RedisBackend):
        return (OSError,)
    exceptions = require_redis("a Redis remote").exceptions
    found = (
        OSError,
        exceptions.ConnectionError,
        exceptions.TimeoutError,
        exceptions.ResponseError,
    )
    if isinstance(base, _CLUSTER_CLASSES):  # "cannot be connected", a slot not covered
        return (*found, exceptions.RedisClusterException)
    return found


def lock_expired_errors(backend: CacheBackend) -> tuple[type[BaseException], ...]:
    """What a remote lock's ``release`` raises when the lock had timed out."""
    if not isinstance(innermost(backend), RedisBackend):
        return ()
    return (require_redis("a Redis remote").exceptions.LockNotOwnedError,)


def lock_can_expire(backend: CacheBackend) -> bool:
    """True if ``backend``'s lock can expire while held (then two creators may run)."""
    base = innermost(backend)
    redis_timeout = getattr(base, "distributed_lock", False) and getattr(
        base, "lock_timeout", None
    )
    return bool(backend.has_lock_timeout() or redis_timeout)


def pitfalls(backend: CacheBackend, lock_mode: str) -> list[str]:
    """Known Redis pitfalls in a remote's settings, one sentence each (empty if none)."""
    base = innermost(backend)
    if not isinstance(base, RedisBackend):
        return []
    found = []
    uses_remote_lock = lock_mode in ("both", "remote")
    if uses_remote_lock and not base.distributed_lock:
        found.append(
            "the remote has distributed_lock=False, so it has no lock across hosts and "
            "every host creates each value itself; set 'distributed_lock': True"
        )
    if uses_remote_lock and base.distributed_lock and base.lock_timeout is None:
        found.append(
            "the remote has no lock_timeout: a lock holder that dies (SIGKILL, OOM, a lost "
            "host) blocks its key on every host forever; set lock_timeout above your "
            "slowest creator (a creator that outlives it loses the lock)"
        )
    if lock_mode == "remote" and base.distributed_lock and base.lock_sleep >= LOCK_SLEEP_DEFAULT:
        found.append(
            f"lock='remote' with lock_sleep={base.lock_sleep:g}: every waiting process "
            "polls Redis and is served up to that long after the creator finishes; use "
            "lock='both' (one poller per host, the others woken by the kernel) or a "
            "lock_sleep of 0.01"
        )
    if isinstance(base, RedisSentinelBackend):
        found.append(
            "dogpile's Sentinel backend reads from a replica: a host can copy a value "
            "older than the newest write (replication lag) into its local tier after the "
            "invalidation has passed, and keep it until local_expiration_time; keep "
            "local_expiration_time short"
        )
    found.extend(_client_pitfalls(base.writer_client))
    return found


def _client_pitfalls(client: Any) -> list[str]:
    """Timeouts and retries of a client the user built (a pool, or a wrapped backend)."""
    try:  # a connection as the pool would make it; nothing is connected
        pool = client.connection_pool
        connection = pool.connection_class(**pool.connection_kwargs)
    except (AttributeError, TypeError):  # a cluster client, or a pool of another kind
        return []
    found = []
    retry = connection.retry
    # redis-py 5.0 has no get_retries(); its Retry keeps the count as _retries.
    retries = retry.get_retries() if hasattr(retry, "get_retries") else retry._retries
    if retries > 1:
        found.append(
            f"the Redis client retries a failed call {retries} times with waits (redis-py's "
            "default without a url): while Redis is down every probe takes that long; pass "
            "connection_kwargs={'retry': Retry(NoBackoff(), 1)}"
        )
    if connection.socket_timeout is None:
        found.append(
            "the Redis client has no socket_timeout: a Redis that hangs blocks every call; "
            "set socket_timeout (a tier uses 1 s unless told otherwise)"
        )
    return found
