"""Region invalidation across hosts: SharedInvalidation carried by a tiered backend.

A :class:`~dogpile_fsbackend.SharedInvalidation` reaches the processes of one
host through a file (invalidation.py).  A tiered backend with pub/sub whose
local ``base_dir`` is the strategy's directory carries it to the other hosts:

* ``invalidate()`` merges its times into a Redis hash (a script keeps the later
  time of each kind, as the file does) and announces them on the tier's
  channel; every host's listener merges them into its own file, where all its
  processes see them at their next check;
* a host that was not listening (starting, or its connection dropped) catches
  up when its subscription is confirmed: it merges its file's times into the
  hash and the hash's into its file, and announces them if its own were newer
  (an invalidation made here while Redis was out).

An invalidation reaches the regions that share the tier's pub/sub ``channel``
(by default one per Redis database): regions to be invalidated separately get
channels of their own.  Merges keep the later time of each kind, so repeats,
echoes and any order converge.
"""

from __future__ import annotations

import logging
from typing import Any

from . import invalidation
from .exceptions import ConfigError, FSBackendError, RemoteError
from .invalidation import InvalidationTimes
from .pubsub import encode_region
from .remote import OUTAGE, RemoteGuard

log = logging.getLogger(__name__)

# Later of each kind, comparing decimal strings (ns since the epoch do not fit Lua's
# doubles); what is not a time is replaced.  Returns the hash's soft and hard times and
# 1 if ours raised either.
_MERGE_SCRIPT = """
local out = {}
local raised = 0
for i, field in ipairs({'soft', 'hard'}) do
  local have = redis.call('HGET', KEYS[1], field) or '0'
  local new = ARGV[i]
  if not string.match(have, '^%d+$') then
    have = ''  -- not a time (planted, or damaged): replaced
  end
  if #new > #have or (#new == #have and new > have) then
    redis.call('HSET', KEYS[1], field, new)
    have = new
    raised = 1
  end
  out[i] = have
end
out[3] = raised
return out
"""


class RegionInvalidationLink:
    """One tiered backend's link between its host's SharedInvalidation and the others."""

    def __init__(self, client: Any, channel: str, directory: str, guard: RemoteGuard) -> None:
        self.directory = directory
        self.channel = channel
        self.key = f"{channel}:region-invalidation"
        self._client = client
        self._merge_script = client.register_script(_MERGE_SCRIPT)
        self._guard = guard
        self.pending = False  # an invalidation of this process not announced yet
        invalidation.announce_with(directory, self)

    # -- called by SharedInvalidation.invalidate() in this process ----------------------

    def announce_invalidation(self, times: InvalidationTimes) -> None:
        """Tell every host; with ``remote_errors="raise"`` an outage raises RemoteError
        (this host's processes honour the invalidation already), else it is logged
        and sent once the remote answers (see :meth:`retry`)."""
        self.pending = True
        if self._guard.call(self._share, times, True) is not OUTAGE:
            self.pending = False

    def retry(self) -> None:
        """Announce an invalidation that an outage held back (the tier calls this on
        its reads and writes while :attr:`pending`); never raises."""
        self.pending = False
        self.catch_up(announce=True)  # Redis may have run the merge that timed out

    # -- called by the listener thread -------------------------------------------------

    def received(self, soft_ns: int, hard_ns: int) -> None:
        strategies = invalidation.strategies_on(self.directory)
        if strategies:
            self._merge_here(strategies[0], InvalidationTimes(soft_ns, hard_ns))

    def catch_up(self, announce: bool = False) -> None:
        """Exchange times with the hash: this host learns what it missed, and what it
        holds that the others missed is announced (always, with ``announce``)."""
        strategies = invalidation.strategies_on(self.directory)
        if not strategies:
            return  # no SharedInvalidation on this directory in this process
        try:
            shared = self._guard.call(self._share, strategies[0].times(), announce)
        except RemoteError:
            shared = OUTAGE  # logged by the guard
        if shared is OUTAGE:
            self.pending = True  # try again at the next read or write
        else:
            self._merge_here(strategies[0], shared)

    # -- internals ----------------------------------------------------------------------

    def _share(self, times: InvalidationTimes, always_announce: bool) -> InvalidationTimes:
        """Merge ``times`` into the hash; announce the result if asked or if ours were
        newer.  Returns the hash's times."""
        soft, hard, raised = self._merge_script(
            keys=[self.key], args=[str(times.soft_ns), str(times.hard_ns)]
        )
        try:
            shared = InvalidationTimes(int(soft), int(hard))
        except (ValueError, ConfigError):
            log.warning("Redis key %r holds no invalidation times: %.80r", self.key, (soft, hard))
            return times
        if always_announce or raised:
            self._client.publish(self.channel, encode_region(shared.soft_ns, shared.hard_ns))
        return shared

    def _merge_here(
        self, strategy: invalidation.SharedInvalidation, times: InvalidationTimes
    ) -> None:
        if times == InvalidationTimes():
            return
        try:
            strategy.merge(times)
        except (OSError, FSBackendError) as exc:
            log.warning("%s: could not merge an invalidation from another host: %s", strategy, exc)
