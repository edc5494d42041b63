"""Redis-side fencing: a worker writes for a job only while the job's stream entry is pending under its name.

Who owns a job is already recorded, atomically, by Redis itself: the consumer group's pending entry
list (PEL) names the consumer each entry was delivered to and counts its deliveries, and XREADGROUP
(first delivery, count 1), XAUTOCLAIM (takeover, count + 1) and JUSTID XCLAIM (lease renewal, count
unchanged) change it in one step. So the fence checks that record, ``XPENDING <stream> workers <id>
<id> 1 <me>`` (one radix-tree lookup in this consumer's PEL, O(log n)), inside the same Lua script
that does the writes: the entry must be pending under this worker's name *with the delivery count it
was taken at* (a fencing token: a job this worker lost and later claimed back is a new delivery, so
what it still held of the old one cannot write either). No separate owner key: a second record would
have to be set by every claimer in the same step as the claim, and any window between the two would
let a stale worker write.

Three scripts, each one round trip, each registered once and run with EVALSHA (redis-py reloads
them after a Redis restart, NOSCRIPT):

* ``publish``: for each job of one engine step, if its entry is still ours and its event log holds
  exactly ``seq`` events, append the event to the log (``keys.progress_key``), and when the job
  finished, XACK+XDEL its entry; then one PUBLISH per gateway of the events written. It returns the
  jobs it fenced, which the worker drops locally. ``LLEN == seq`` also makes the script idempotent
  (a command that redis-py re-sends after a lost reply writes nothing twice) and refuses a gap (a log
  that lost events, e.g. to a Redis restart): such a job is left to be resumed from its log.
* ``renew``: reset the idle time (JUSTID XCLAIM) of the entries still ours; report the others. The
  check and the claim are atomic, so a renewal can never take back a job another worker just claimed.
* ``hand_back``: re-queue unfinished jobs (XADD a copy, XACK+XDEL the old entry) that are still ours.

Scripts touch several keys (the stream and per-request logs), so they need a single Redis (or keys
sharing one hash slot on a cluster), as the rest of spindle does.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis.asyncio as aioredis

from protocol import keys
from protocol.messages import EventBatch

# The owner check shared by the scripts: pending under ``consumer`` with ``deliveries`` deliveries.
# redis.pcall: a missing stream or group (Redis restarted without its data) is "not ours", not an error.
_OWNED = """
local function owned(stream, group, consumer, id, deliveries)
  local p = redis.pcall('XPENDING', stream, group, id, id, 1, consumer)
  return type(p) == 'table' and p.err == nil and #p == 1 and p[1][4] == tonumber(deliveries)
end
"""

# KEYS: stream, progress key of job 1..n. ARGV: group, consumer, log ttl ms, batch head, batch tail,
# then per job: entry id, deliveries, seq, gateway channel, finished (1/0), event JSON.
PUBLISH_LUA = _OWNED + """
local stream, group, consumer, ttl = KEYS[1], ARGV[1], ARGV[2], ARGV[3]
local head, tail = ARGV[4], ARGV[5]
local fenced, batches, channels = {}, {}, {}
for i = 2, #KEYS do
  local a = 6 + (i - 2) * 6
  local id, deliveries, seq = ARGV[a], ARGV[a + 1], tonumber(ARGV[a + 2])
  local channel, finished, event = ARGV[a + 3], ARGV[a + 4], ARGV[a + 5]
  local log = KEYS[i]
  if not owned(stream, group, consumer, id, deliveries) then
    fenced[#fenced + 1] = {id, 'not_owner'}
  else
    local len = redis.call('LLEN', log)
    if len < seq then
      fenced[#fenced + 1] = {id, 'gap'}
    elseif len == seq then
      redis.call('RPUSH', log, event)
      redis.call('PEXPIRE', log, ttl)
      if batches[channel] == nil then
        batches[channel] = {}
        channels[#channels + 1] = channel
      end
      table.insert(batches[channel], event)
      if finished == '1' then
        redis.call('XACK', stream, group, id)
        redis.call('XDEL', stream, id)
      end
    end
  end
end
for _, channel in ipairs(channels) do
  redis.call('PUBLISH', channel, head .. table.concat(batches[channel], ',') .. tail)
end
return fenced
"""

# KEYS: stream. ARGV: group, consumer, then per job: entry id, deliveries. Returns the ids no longer ours.
RENEW_LUA = _OWNED + """
local stream, group, consumer = KEYS[1], ARGV[1], ARGV[2]
local lost = {}
for a = 3, #ARGV, 2 do
  if owned(stream, group, consumer, ARGV[a], ARGV[a + 1]) then
    redis.call('XCLAIM', stream, group, consumer, 0, ARGV[a], 'JUSTID')
  else
    lost[#lost + 1] = ARGV[a]
  end
end
return lost
"""

# KEYS: stream. ARGV: group, consumer, then per job: entry id, deliveries, field count n, n field names
# and values (interleaved). Returns the ids no longer ours (not re-queued).
HAND_BACK_LUA = _OWNED + """
local stream, group, consumer = KEYS[1], ARGV[1], ARGV[2]
local lost, a = {}, 3
while a <= #ARGV do
  local id, n = ARGV[a], tonumber(ARGV[a + 2])
  if owned(stream, group, consumer, id, ARGV[a + 1]) then
    local fields = {}
    for j = 1, 2 * n do fields[j] = ARGV[a + 2 + j] end
    redis.call('XADD', stream, '*', unpack(fields))
    redis.call('XACK', stream, group, id)
    redis.call('XDEL', stream, id)
  else
    lost[#lost + 1] = id
  end
  a = a + 3 + 2 * n
end
return lost
"""


def batch_frame() -> tuple[str, str]:
    """The text of an ``EventBatch`` around its events: head + ",".join(event JSONs) + tail."""
    empty = EventBatch(events=[]).encode()
    marker = '"events":['
    cut = empty.index(marker) + len(marker)
    return empty[:cut], empty[cut:]


@dataclass
class Write:
    """One job's event of one engine step."""

    entry_id: str
    deliveries: int  # the entry's delivery count when this worker took it (the fencing token)
    request_id: str
    seq: int
    gateway_id: str
    finished: bool
    event_json: str


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class Fence:
    """The three fenced writes of one worker (consumer ``consumer`` of ``keys.JOBS_GROUP``)."""

    def __init__(self, redis: aioredis.Redis, consumer: str, progress_ttl_ms: int):
        self.redis = redis
        self.consumer = consumer
        self.progress_ttl_ms = progress_ttl_ms
        self.head, self.tail = batch_frame()
        self._publish = redis.register_script(PUBLISH_LUA)
        self._renew = redis.register_script(RENEW_LUA)
        self._hand_back = redis.register_script(HAND_BACK_LUA)

    async def publish(self, stream: str, writes: list[Write]) -> dict[str, str]:
        """Write and publish one step's events; the entries fenced off, with why (``not_owner``, ``gap``)."""
        if not writes:
            return {}
        args: list[str | int] = [keys.JOBS_GROUP, self.consumer, self.progress_ttl_ms, self.head, self.tail]
        for w in writes:
            args += [w.entry_id, w.deliveries, w.seq, keys.events_channel(w.gateway_id), int(w.finished),
                     w.event_json]
        fenced = await self._publish(keys=[stream, *(keys.progress_key(w.request_id) for w in writes)], args=args)
        return {_text(entry): _text(why) for entry, why in fenced}

    async def renew(self, stream: str, entries: list[tuple[str, int]]) -> set[str]:
        """Renew the leases of the ``(entry_id, deliveries)`` still ours; the ids that are not."""
        if not entries:
            return set()
        args = [keys.JOBS_GROUP, self.consumer, *(x for entry in entries for x in entry)]
        return {_text(e) for e in await self._renew(keys=[stream], args=args)}

    async def hand_back(self, stream: str, jobs: list[tuple[str, int, dict[str, str]]]) -> set[str]:
        """Re-queue ``(entry_id, deliveries, new fields)`` for each job still ours; the ids that were not."""
        if not jobs:
            return set()
        args: list[str | int] = [keys.JOBS_GROUP, self.consumer]
        for entry_id, deliveries, fields in jobs:
            args += [entry_id, deliveries, len(fields), *(x for kv in fields.items() for x in kv)]
        lost = await self._hand_back(keys=[stream], args=args)
        return {_text(e) for e in lost}
