"""Several hosts: this host's disk cache in front of a shared remote backend (Redis).

Reads go to the local tier first; a local miss reads the remote, and a remote
hit is copied into the local tier.  Writes and deletes go to the remote first,
then to the local tier.  Both tiers hold the very bytes dogpile serialized, so
dogpile's creation time, and with it the region's expiration, mean the same
on every host.  Locks: see tierlock.py; coherence: pubsub.py; outages:
remote.py.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import socket
import threading
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NoReturn, cast

from dogpile.cache.api import NO_VALUE, BytesBackend, CacheBackend, CachedValue, CacheMutex
from dogpile.cache.proxy import ProxyBackend

from . import forking, layout, records, redisremote
from .backends import PickleFSBackend, dogpile_bytes, from_dogpile_bytes
from .config import parse_seconds
from .exceptions import ConfigError, RemoteConfigWarning, RemoteError
from .pubsub import RECENT_KEYS, Listener, default_channel, encode, value_digest
from .remote import OUTAGE, RemoteGuard, describe, load_backend, not_listable
from .tierconfig import (
    OUTAGE_DEFAULTS,
    OUTAGE_PARSERS,
    as_config,
    has_tier,
    local_tier,
    parse_choice,
    parse_lock_mode,
    parse_top_level,
    refuse_read_only,
    sub_config,
    tier_arguments,
    top_level_of_config,
)
from .tierinvalidation import RegionInvalidationLink
from .tierlock import tier_mutex

if TYPE_CHECKING:
    from dogpile.cache.api import NoValueType  # dogpile.cache 1.3.3+ only

log = logging.getLogger(__name__)

__all__ = ["TieredBackend", "TieredProxy"]

_UNSET = object()  # "invalidation" not given: pub/sub if the remote is Redis


def _optional_text(name: str, value: Any) -> str | None:
    if value is None or (isinstance(value, str) and value):
        return value
    raise ConfigError(name, "a non-empty string or None", value)


def _remote_backend_name(name: str, value: Any) -> str:
    load_backend(value, name)  # checks that it names an installed backend
    return str(value)


PARSERS = {
    **OUTAGE_PARSERS,
    "lock": parse_lock_mode,
    "remote_backend": _remote_backend_name,
    "local_expiration_time": parse_seconds,
    "invalidation": parse_choice(("pubsub", None)),
    "channel": _optional_text,
}
DEFAULTS = {
    **OUTAGE_DEFAULTS,
    "lock": "both",
    "local_expiration_time": None,
    "invalidation": _UNSET,
    "channel": None,
}
TIERS = ("local", "remote")
ANNOUNCE_BATCH = 1000  # keys per message when announcing the changes an outage kept quiet


class _TieredOperations:
    """The two-tier logic, shared by :class:`TieredBackend` and :class:`TieredProxy`."""

    local: PickleFSBackend
    remote: CacheBackend
    guard: RemoteGuard
    lock_mode: str
    listener: Listener | None
    channel: str
    origin: str

    def _setup(
        self, settings: Mapping[str, Any], local: PickleFSBackend, remote: CacheBackend, name: str
    ) -> None:
        self.local = local
        self.remote = remote
        self.lock_mode = settings["lock"]
        self.guard = RemoteGuard(
            name,
            redisremote.error_types(remote),
            settings["remote_errors"],
            settings["remote_backoff"],
            settings["remote_backoff_max"],
        )
        self._lock_expired = redisremote.lock_expired_errors(remote)
        self.origin = _origin(local)
        self.local_hits = self.remote_hits = self.misses = self.invalidations = 0
        invalidation = settings["invalidation"]
        if invalidation is _UNSET:
            invalidation = "pubsub" if redisremote.supports_pubsub(remote) else None
        elif invalidation == "pubsub" and not redisremote.supports_pubsub(remote):
            raise ConfigError(
                "invalidation",
                "None unless the remote is dogpile.cache.redis or redis_sentinel "
                "(pub/sub needs a Redis server)",
                invalidation,
            )
        self.invalidation = invalidation
        self.listener = None
        self.region_invalidation: RegionInvalidationLink | None = None
        self._publish: Callable[[str, bytes], Any] | None = None
        self._unannounced: set[str] = set()  # changed while no message could say so
        self._unannounced_lock = threading.Lock()
        forking.reset_in_children(self)
        self._unannounced_overflowed = False  # logged once per outage
        if invalidation == "pubsub":
            client = redisremote.client_of(remote)
            self.channel = settings["channel"] or default_channel(client)
            self._publish = client.publish  # type: ignore[union-attr]
            self.listener = Listener.for_client(client, self.channel)
            self.region_invalidation = RegionInvalidationLink(
                client, self.channel, local.settings.base_dir, self.guard
            )
            self.region_invalidation.catch_up()
            self.listener.register(self)
        self._warn_pitfalls(redisremote.pitfalls(remote, self.lock_mode), settings)

    def _warn_pitfalls(self, found: list[str], settings: Mapping[str, Any]) -> None:
        unbounded = settings["local_expiration_time"] is None
        if self.invalidation is None and unbounded and self.local.settings.expiration_time is None:
            found.append(
                "invalidation=None and no local_expiration_time: a host keeps serving "
                "its local copy after another host changed or deleted the value, "
                "until it is evicted; set local_expiration_time"
            )
        for message in found:
            log.warning("dogpile_fsbackend.tiered (%s): %s", self.guard.name, message)
            warnings.warn(message, RemoteConfigWarning, stacklevel=5)

    # -- reads ----------------------------------------------------------------------

    def get_serialized(self, key: str) -> bytes | NoValueType:
        return self.get_serialized_multi([key])[0]

    def get_serialized_multi(self, keys: Iterable[str]) -> list[bytes | NoValueType]:
        keys = list(keys)
        listener = self.listener
        if listener is not None:
            listener.ensure_running()
            self._announce_unannounced()
        found: list[bytes | NoValueType] = []
        untrusted: dict[int, bytes | NoValueType] = {}  # position -> local copy or NO_VALUE
        for position, key in enumerate(keys):
            local = self.local.get_serialized_stamped(key)
            if local is not NO_VALUE and (listener is None or listener.trusts(local[1])):
                found.append(local[0])
                self.local_hits += 1
                continue
            found.append(NO_VALUE)
            untrusted[position] = NO_VALUE if local is NO_VALUE else local[0]
        if not untrusted:
            return found
        wanted = [keys[position] for position in untrusted]
        generation = listener.generation if listener is not None else 0
        remote = self.guard.call(self.remote.get_serialized_multi, wanted)
        if remote is OUTAGE:  # degrade: this host's copies, trusted or not
            for position, copy in untrusted.items():
                found[position] = copy
            return found
        copies = {}
        for (position, copy), value in zip(untrusted.items(), remote, strict=True):
            key = keys[position]
            if value is NO_VALUE:
                self.misses += 1
                if copy is not NO_VALUE:
                    self.local.delete(key)  # changed or deleted while we could not hear of it
                continue
            self.remote_hits += 1
            found[position] = copies[key] = value
        self._copy_in(copies, generation)
        return found

    def _copy_in(self, copies: Mapping[str, bytes], generation: int) -> None:
        """Store remote hits locally, unless an invalidation raced the read.

        Not while the listener is unsubscribed: such a copy would predate its
        next subscription, and so never be trusted.
        """
        listener = self.listener
        if listener is not None and not listener.connected:
            return
        copies = {key: value for key, value in copies.items() if self._fits_locally(key, value)}
        if not copies:
            return
        self.local.set_serialized_multi(copies)
        if listener is not None:
            self._drop_outdated(copies, generation)

    def _fits_locally(self, key: str, value: bytes) -> bool:
        """False for a value the local tier would refuse (with a CacheSizeWarning on
        every read); a set still warns."""
        size = records.HEADER_SIZE + len(layout.encode_key(key)) + len(value)
        return size <= self.local.room()

    # -- writes ---------------------------------------------------------------------

    def set_serialized(self, key: str, value: bytes) -> None:
        self.set_serialized_multi({key: value})

    def set_serialized_multi(self, mapping: Mapping[str, bytes]) -> None:
        if not mapping:
            return
        listener = self.listener
        if listener is not None:
            self._announce_unannounced()
        since = listener.generation if listener is not None else 0
        written = self.guard.call(self.remote.set_serialized_multi, mapping)
        remembered: tuple[int, set[str]] | None = None
        announced = False
        try:
            if written is not OUTAGE and listener is not None:
                remembered = listener.remember(mapping, since)  # racing readers: at once
                announced = self._announce(mapping)
        finally:
            self.local.set_serialized_multi(mapping)
            if remembered is not None:
                self._drop_outdated(mapping, *remembered)
            if listener is not None and not announced:
                self._note_unannounced(mapping)

    def _drop_outdated(
        self, keys: Iterable[str], generation: int, changed: Iterable[str] = ()
    ) -> None:
        """Drop the copies just written of keys invalidated after ``generation`` was
        read, or in ``changed`` (see pubsub.Listener.remember): the remote may hold
        another value than the one copied or written."""
        assert self.listener is not None
        listener = self.listener
        outdated = {*changed, *(key for key in keys if listener.changed_since(key, generation))}
        if outdated:
            self.local.delete_multi(outdated)

    def delete(self, key: str) -> None:
        self.delete_multi([key])

    def delete_multi(self, keys: Iterable[str]) -> None:
        keys = list(keys)
        if not keys:
            return
        listener = self.listener
        if listener is not None:
            self._announce_unannounced()
        announced = False
        try:
            deleted = self.guard.call(self.remote.delete_multi, keys)
            if deleted is not OUTAGE and listener is not None:
                listener.remember(keys)  # this process's racing readers: at once
                announced = self._announce(dict.fromkeys(keys))
        finally:
            self.local.delete_multi(keys)  # dropping a copy is never wrong
            if listener is not None and not announced:
                self._note_unannounced(keys)

    def _announce(self, entries: Mapping[str, bytes | None]) -> bool:
        """Tell the other processes (after the remote write, before the local one)."""
        assert self._publish is not None
        sent = self.guard.call(self._publish, self.channel, encode(self.origin, entries))
        return sent is not OUTAGE

    # -- changes that no message announced ------------------------------------------

    def _reset_after_fork(self) -> None:
        """A thread of the parent may have held the lock at fork(): the child, which has
        none of those threads, gets an unheld one (what it guards is copied as it was)."""
        self._unannounced_lock = threading.Lock()

    def _note_unannounced(self, keys: Iterable[str]) -> None:
        """Remember keys set or deleted without a message (the remote was out, or refused
        the write or the message): the channel may never have dropped, so the other
        processes still trust their copies, and a local-only value is trusted here."""
        with self._unannounced_lock:
            room = max(0, RECENT_KEYS - len(self._unannounced))
            new = [key for key in keys if key not in self._unannounced]
            self._unannounced.update(new[:room])
            first_overflow = len(new) > room and not self._unannounced_overflowed
            self._unannounced_overflowed |= first_overflow
        if first_overflow:
            log.warning(
                "dogpile_fsbackend.tiered (%s): more than %d keys changed while the remote "
                "was out; the others will not be announced when it returns, and hosts may "
                "serve their older copies of them until local_expiration_time",
                self.guard.name,
                RECENT_KEYS,
            )
        self._announce_unannounced()  # the remote may be back already

    def _announce_unannounced(self) -> None:
        """Once the remote answers again, announce those keys as deleted and drop their
        local copies, so that the remote is the shared truth again.

        Its publish is the probe that finds the remote back when this process
        otherwise only hits its local tier.  A region invalidation that an outage
        held back goes out the same way (tierinvalidation.py).
        """
        link = self.region_invalidation
        if link is not None and link.pending:
            link.retry()
        if not self._unannounced:
            return
        with self._unannounced_lock:
            keys, self._unannounced = list(self._unannounced), set()
            self._unannounced_overflowed = False
        assert self.listener is not None and self._publish is not None
        for start in range(0, len(keys), ANNOUNCE_BATCH):
            batch = keys[start : start + ANNOUNCE_BATCH]
            message = encode(self.origin, dict.fromkeys(batch))
            try:
                sent = self.guard.call(self._publish, self.channel, message)
            except RemoteError:  # remote_errors="raise": no caller asked for this call
                sent = OUTAGE
            if sent is OUTAGE:
                with self._unannounced_lock:
                    self._unannounced.update(keys[start:])
                return
            self.listener.remember(batch)
            self.local.delete_multi(batch)

    def invalidated(self, origin: str, entries: Sequence[tuple[str, str | None]]) -> None:
        """The listener heard of a write or delete: drop the copies it outdated.

        Another host's message drops the copy outright.  A message from another
        process of this host drops it only if it is not the bytes announced, so
        the writer's fresh copy stays while a racing reader's older one goes.
        """
        self.invalidations += 1
        for key, digest in entries:
            if origin != self.origin or digest is None:
                self.local.delete(key)
                continue
            copy = self.local.get_serialized_stamped(key, count=False)
            if copy is not NO_VALUE and value_digest(copy[0]) != digest:
                self.local.delete(key)

    def region_invalidated(self, soft_ns: int, hard_ns: int) -> None:
        """The listener heard of another host's ``region.invalidate()``."""
        if self.region_invalidation is not None:
            self.region_invalidation.received(soft_ns, hard_ns)

    def subscribed(self) -> None:
        """The listener (re)subscribed: catch up on the invalidations it may have missed."""
        if self.region_invalidation is not None:
            self.region_invalidation.catch_up()

    # -- listing: refused (see remote.not_listable) ----------------------------------

    def keys(self, prefix: str | None = None) -> NoReturn:
        raise not_listable("keys", self.guard.name)

    def delete_matching(self, prefix: str) -> NoReturn:
        raise not_listable("delete_matching", self.guard.name)

    # -- locks ----------------------------------------------------------------------

    def get_mutex(self, key: str) -> CacheMutex | None:
        local = self.local.get_mutex(key)
        if self.lock_mode == "local":
            return local
        mutex = tier_mutex(
            self.lock_mode,
            local,
            self.remote.get_mutex(key),
            self.guard,
            self._lock_expired,
            lambda since: self._written_since(key, since),
        )
        if mutex is local or mutex is None:
            return mutex
        return self.local.rechecking(mutex, key)  # dogpile's second look: the same lookup

    def _written_since(self, key: str, since: float) -> bool:
        copy = self.local.get_serialized_stamped(key, count=False)
        return copy is not NO_VALUE and copy[1] >= since

    def has_lock_timeout(self) -> bool:
        """True if the remote's lock can expire while held (then two creators may run)."""
        return self.lock_mode != "local" and redisremote.lock_can_expire(self.remote)

    # -- observability --------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """The local tier's figures plus this instance's tier counters and health."""
        figures: dict[str, Any] = dict(self.local.stats())
        figures.update(
            local_hits=self.local_hits,
            remote_hits=self.remote_hits,
            tier_misses=self.misses,
            invalidations=self.invalidations,
            **self.guard.stats(),
        )
        if self.listener is not None:
            figures.update(
                listener_connected=self.listener.connected,
                trusted_since=self.listener.trusted_since,
            )
        return figures


class TieredBackend(_TieredOperations, BytesBackend):
    """This host's disk cache (``dogpile_fsbackend.pickled``) in front of a shared remote.

    Basic usage::

        region = make_region().configure(
            "dogpile_fsbackend.tiered",
            expiration_time=3600,
            arguments={
                "local": {"base_dir": "/var/cache/myapp", "cache_size": "2GiB"},
                "remote_backend": "dogpile.cache.redis",
                "remote": {"url": "redis://cache:6379/0", "distributed_lock": True,
                           "lock_timeout": 120, "redis_expiration_time": 86400},
                "lock": "both",
                "local_expiration_time": 60,
                "invalidation": "pubsub",
                "remote_errors": "raise",
            },
        )

    :param local: the local tier's arguments: those of ``dogpile_fsbackend.pickled``
     (``base_dir``, ``cache_size``, ...).  Required.
    :param remote_backend: the shared tier, any dogpile backend by name
     (``"dogpile.cache.redis"``, ``"dogpile.cache.redis_sentinel"``, ...).  Required.
    :param remote: the remote tier's arguments (default ``{}``).  For dogpile's Redis
     backends the tier adds ``socket_connect_timeout=0.5``, ``socket_timeout=1``, one
     immediate retry (``connection_kwargs={"retry": Retry(NoBackoff(), 1)}``) and
     ``thread_local_lock=False`` unless given (for ``redis_cluster`` the timeouts go
     into ``connection_kwargs``, the only arguments dogpile's cluster backend passes on).
    :param lock: ``"both"`` (default): this host's kernel lock, then the remote's lock;
     ``"remote"``: the remote's only; ``"local"``: one creator per host.
    :param local_expiration_time: seconds a local copy is used before it is read
     from the remote again: the most it may lag another host's write or delete (it
     becomes the local tier's ``expiration_time``).  Default ``None``: until
     invalidated or evicted.
    :param invalidation: ``"pubsub"`` (the default for Redis remotes, else ``None``):
     writes and deletes are announced on a Redis channel and every host drops its copy.
    :param channel: the pub/sub channel (default ``dogpile_fsbackend:invalidate:<db>``:
     Redis channels are server-wide, so one per database).  A
     :class:`SharedInvalidation` on the local ``base_dir`` reaches every host through it:
     one ``region.invalidate()`` reaches the regions sharing the channel.
    :param remote_errors: ``"raise"`` (default): a failed remote call raises
     :class:`RemoteError` naming the remote; ``"degrade"``: serve and write locally, with
     local locks, until the remote answers again.
    :param remote_backoff: seconds without remote calls after a failure (default 1),
     doubling on each failed probe up to ``remote_backoff_max``.
    :param remote_backoff_max: the longest back-off, in seconds (default 30).

    .. versionadded:: 0.2.0
    """

    def __init__(self, arguments: Mapping[str, Any]) -> None:
        settings = _parse(arguments, local_given=has_tier(arguments, "local"))
        remote_class = load_backend(settings["remote_backend"], "remote_backend")
        remote_arguments = redisremote.with_defaults(
            remote_class, tier_arguments(arguments, "remote")
        )
        local_arguments = _local_arguments(tier_arguments(arguments, "local"), settings)
        local = local_tier(lambda: PickleFSBackend(local_arguments))
        remote = remote_class(remote_arguments)
        self._setup(
            settings, local, remote, describe(settings["remote_backend"], remote_arguments)
        )
        self.key_mangler = remote.key_mangler

    @classmethod
    def from_config_dict(cls, config_dict: Mapping[str, Any], prefix: str) -> TieredBackend:
        """From ``configure_from_config``: ``<prefix>local.*`` and ``<prefix>remote.*`` keys
        go to each tier's own ``from_config_dict``, so each coerces its own strings."""
        local_prefix, remote_prefix = f"{prefix}local.", f"{prefix}remote."
        settings = _parse(
            top_level_of_config(config_dict, prefix),
            local_given=any(key.startswith(local_prefix) for key in config_dict),
        )
        remote_class = load_backend(settings["remote_backend"], "remote_backend")
        local_config = as_config(
            _local_arguments(sub_config(config_dict, local_prefix), settings), local_prefix
        )
        remote_arguments = redisremote.with_defaults(
            remote_class, sub_config(config_dict, remote_prefix)
        )
        local = local_tier(
            lambda: cast(
                PickleFSBackend, PickleFSBackend.from_config_dict(local_config, local_prefix)
            )
        )
        remote = remote_class.from_config_dict(
            as_config(remote_arguments, remote_prefix), remote_prefix
        )
        backend = cls.__new__(cls)
        backend._setup(
            settings, local, remote, describe(settings["remote_backend"], remote_arguments)
        )
        backend.key_mangler = remote.key_mangler
        return backend


class TieredProxy(_TieredOperations, ProxyBackend):
    """A local disk tier in front of a backend you already have (the remote).

    Basic usage::

        region = make_region().configure(
            "dogpile.cache.redis",
            arguments={"url": "redis://cache:6379/0", "distributed_lock": True,
                       "lock_timeout": 120, "thread_local_lock": False,
                       "socket_timeout": 1, "socket_connect_timeout": 0.5},
            wrap=[TieredProxy(local={"base_dir": "/var/cache/myapp"},
                              local_expiration_time=60)],
        )

    Takes the arguments of :class:`TieredBackend` except ``remote_backend`` and
    ``remote``: the wrapped backend is the remote tier, used with its own
    connection settings.  The region must serialize (a ``BytesBackend`` such as
    Redis, or a region ``serializer``), or wrap ``dogpile_fsbackend.pickled``, whose
    values the proxy pickles as dogpile's default serializer would.
    """

    def __init__(self, arguments: Mapping[str, Any] | None = None, **keywords: Any) -> None:
        merged = {**(arguments or {}), **keywords}
        for name in ("remote_backend", "remote"):
            if name in merged:
                raise ConfigError(
                    name, "left out: the backend a TieredProxy wraps is the remote", merged[name]
                )
        self._settings = _parse(merged, local_given=has_tier(merged, "local"), proxy=True)
        local_arguments = _local_arguments(tier_arguments(merged, "local"), self._settings)
        self._local = local_tier(lambda: PickleFSBackend(local_arguments))

    def wrap(self, backend: CacheBackend) -> TieredProxy:
        super().wrap(backend)
        # dogpile_fsbackend.pickled pickles values itself, so its region has no serializer:
        # the proxy makes the bytes that dogpile's default serializer would have made.
        self._pickles = isinstance(redisremote.innermost(backend), PickleFSBackend)
        self._setup(self._settings, self._local, backend, _name_of(backend))
        return self

    def get(self, key: str) -> CachedValue | NoValueType:
        return self.get_multi([key])[0]

    def get_multi(self, keys: Iterable[str]) -> list[CachedValue | NoValueType]:
        self._check_pickles()
        return [
            NO_VALUE if found is NO_VALUE else from_dogpile_bytes(found)
            for found in self.get_serialized_multi(keys)
        ]

    def set(self, key: str, value: CachedValue | bytes) -> None:
        self.set_multi({key: value})

    def set_multi(self, mapping: Mapping[str, CachedValue | bytes]) -> None:
        self._check_pickles()
        self.set_serialized_multi(
            {
                key: value if isinstance(value, bytes) else dogpile_bytes(value)
                for key, value in mapping.items()
            }
        )

    def _check_pickles(self) -> None:
        if not self._pickles:
            raise TypeError(
                "TieredProxy stores serialized bytes: wrap a backend that serializes (a "
                "BytesBackend such as dogpile.cache.redis, or dogpile_fsbackend.pickled), "
                "or give the region a serializer"
            )


def _parse(
    arguments: Mapping[str, Any], *, local_given: bool, proxy: bool = False
) -> dict[str, Any]:
    if not local_given:
        raise ConfigError(
            "local", "given: a dict of the local tier's arguments (base_dir, ...)", None
        )
    parsers = dict(PARSERS)
    if proxy:  # the remote is the wrapped backend
        del parsers["remote_backend"]
    elif "remote_backend" not in arguments:
        raise ConfigError(
            "remote_backend", "given: a dogpile backend name such as 'dogpile.cache.redis'", None
        )
    return parse_top_level(arguments, parsers, DEFAULTS, TIERS)


def _local_arguments(arguments: dict[str, Any], settings: Mapping[str, Any]) -> dict[str, Any]:
    """The local tier's arguments, with ``local_expiration_time`` as its expiration."""
    refuse_read_only(arguments)
    limit = settings["local_expiration_time"]
    if limit is not None:
        own = parse_seconds("local.expiration_time", arguments.get("expiration_time"))
        arguments["expiration_time"] = min(limit, own if own is not None else math.inf)
    return arguments


def _origin(local: PickleFSBackend) -> str:
    """Names this host's local tier in messages: one per host and cache directory."""
    base_dir = local.settings.base_dir
    info = os.stat(base_dir)
    seed = f"{socket.gethostname()}|{base_dir}|{info.st_dev}|{info.st_ino}"
    return hashlib.sha256(seed.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def _name_of(backend: CacheBackend) -> str:
    base = redisremote.innermost(backend)
    name = f"{type(base).__module__}.{type(base).__name__}"
    client = redisremote.client_of(base)
    if client is None:
        return name
    kwargs = getattr(client.connection_pool, "connection_kwargs", {})
    return describe(name, {key: kwargs[key] for key in ("host", "port", "db") if key in kwargs})
