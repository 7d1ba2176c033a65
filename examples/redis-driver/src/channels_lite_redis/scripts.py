"""The Lua scripts: each driver operation that must be atomic is one script.

Redis runs a script without interleaving any other command, which gives the contract's atomicity
for free: "count then store" (exact capacity), "read then remove" (a claim never returns a message
twice), and "renew my lease and reap the dead" are each one script call.

Every script gets the key prefix as ``ARGV[1]`` and builds key names from it, so one Redis database
can hold several independent layers (and tests can isolate themselves with a fresh prefix). Keys
are therefore not all declared in ``KEYS`` (only receipts are): the driver supports standalone
Redis (and Redis-compatible servers such as Valkey), not Redis Cluster.

Key layout under prefix ``P`` (``<id>`` is a message id from ``P seq``, increasing):

``P seq``               counter giving message ids; never reset, so ids keep push order
``P m:<id>``            hash ``c`` channel, ``k`` routing key, ``p`` payload, ``e`` expires_at
``P k:<key>``           zset of ids routed under ``key``, scored by id: FIFO per key
``P c:<channel>``       zset of ids of ``channel``, scored by expires_at: capacity counts
``P e``                 zset of every id, scored by expires_at: purge and stats
``P g:<group>``         zset of member channels, scored by membership expires_at
``P gk:<group>``        hash member channel -> routing key
``P ge``                zset of every membership (``enc``), scored by expires_at: purge
``P km:<key>``          set of memberships (``enc``) routed under ``key``: reaping
``P l``                 zset of process keys, scored by lease expires_at
``P n``                 pub/sub channel: a push published the pusher's token here
``P r:<receipt>``       list: a push's or claim's reply (``done`` first) or a tombstone
                        (``cancelled``); short-lived, see "Receipts" below

Receipts. A push or claim whose reply never reaches the caller (its task cancelled mid-call, as
``asyncio.run`` does to every task of a loop it tears down, or the connection lost) would lose
messages (a claim) or store them twice on retry (a push). So these two scripts get a fresh
receipt key as ``KEYS[1]`` and keep a copy of their reply there for ``RECEIPT_TTL_MS``; the
driver then asks :data:`RECOVER` for it. ``RECOVER`` either takes the reply (the script ran) or
leaves a tombstone that stops the script from running later (it had not run yet): Redis runs
scripts one at a time, so exactly one of the two happens first. ``KEYS[2:]`` are earlier
receipts whose replies arrived, deleted on the way so they do not wait for their TTL.

``enc`` of a membership is ``<len(group)>:<group><channel>``, unambiguous for any names.
Times are the ``now`` and ``expires_at`` floats the core passed in, sent as Python ``repr``
strings, so Lua and Redis parse back exactly the same double.
"""

from __future__ import annotations

#: How long a receipt outlives its script: far longer than a caller needs to ask for it.
RECEIPT_TTL_MS = 60_000

# Helpers shared by several scripts; each script is this prelude plus its body.
_PRELUDE = """
local P = ARGV[1]
local RECEIPT_TTL_MS = @RECEIPT_TTL_MS@

-- Receipts (see the module docstring). False if a tombstone says the caller gave up on us.
local function receipt_open()
  for k = 2, #KEYS do
    redis.call("DEL", KEYS[k])
  end
  return redis.call("EXISTS", KEYS[1]) == 0
end

local function receipt_keep(reply)
  redis.call("RPUSH", KEYS[1], "done")
  -- In slices: unpack() of a long list would overflow Lua's C stack.
  for first = 1, #reply, 512 do
    redis.call("RPUSH", KEYS[1], unpack(reply, first, math.min(first + 511, #reply)))
  end
  redis.call("PEXPIRE", KEYS[1], RECEIPT_TTL_MS)
end

local function enc(group, channel)
  return string.len(group) .. ":" .. group .. channel
end

local function dec(member)
  local colon = string.find(member, ":", 1, true)
  local n = tonumber(string.sub(member, 1, colon - 1))
  return string.sub(member, colon + 1, colon + n), string.sub(member, colon + n + 1)
end

-- Remove one message everywhere it is indexed.
local function drop(id, channel, key)
  if key then redis.call("ZREM", P .. "k:" .. key, id) end
  if channel then redis.call("ZREM", P .. "c:" .. channel, id) end
  redis.call("ZREM", P .. "e", id)
  redis.call("DEL", P .. "m:" .. id)
end

-- Remove one membership everywhere it is indexed.
local function drop_member(group, channel)
  local gk = P .. "gk:" .. group
  local key = redis.call("HGET", gk, channel)
  local member = enc(group, channel)
  redis.call("ZREM", P .. "g:" .. group, channel)
  redis.call("HDEL", gk, channel)
  redis.call("ZREM", P .. "ge", member)
  if key then redis.call("SREM", P .. "km:" .. key, member) end
end

-- Everything routed under a process key: its lease, messages and memberships.
local function forget(key)
  redis.call("ZREM", P .. "l", key)
  local kkey = P .. "k:" .. key
  for _, id in ipairs(redis.call("ZRANGE", kkey, 0, -1)) do
    drop(id, redis.call("HGET", P .. "m:" .. id, "c"), nil)
  end
  redis.call("DEL", kkey)
  local kmkey = P .. "km:" .. key
  for _, member in ipairs(redis.call("SMEMBERS", kmkey)) do
    local group, channel = dec(member)
    drop_member(group, channel)
  end
  redis.call("DEL", kmkey)
end
""".replace("@RECEIPT_TTL_MS@", str(RECEIPT_TTL_MS))

#: KEYS: receipt, acknowledged receipts. ARGV: prefix, now, token, count, then per envelope:
#: channel, key, payload, expires_at, capacity. Returns one 0/1 flag per envelope (none if a
#: tombstone says the caller gave up).
PUSH = (
    _PRELUDE
    + """
if not receipt_open() then return {} end
local now = ARGV[2]
local token = ARGV[3]
local count = tonumber(ARGV[4])
local flags = {}
local stored = 0
local i = 5
for n = 1, count do
  local channel, key, payload, expires_at = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local capacity = tonumber(ARGV[i + 4])
  i = i + 5
  local ckey = P .. "c:" .. channel
  -- Only unexpired messages count: "(" makes the lower bound exclusive (expires_at > now).
  if redis.call("ZCOUNT", ckey, "(" .. now, "+inf") < capacity then
    local id = redis.call("INCR", P .. "seq")
    redis.call("HSET", P .. "m:" .. id, "c", channel, "k", key, "p", payload, "e", expires_at)
    redis.call("ZADD", P .. "k:" .. key, id, id)
    redis.call("ZADD", ckey, expires_at, id)
    redis.call("ZADD", P .. "e", expires_at, id)
    flags[n] = 1
    stored = stored + 1
  else
    flags[n] = 0
  end
end
if stored > 0 then
  redis.call("PUBLISH", P .. "n", token)
end
receipt_keep(flags)
return flags
"""
)

#: KEYS: receipt, acknowledged receipts. ARGV: prefix, now, request count, then per request:
#: key, limit, exclude count, excluded channels. Returns a flat list: channel, key, payload,
#: expires_at, ... oldest first per key.
CLAIM = (
    _PRELUDE
    + """
if not receipt_open() then return {} end
local now = tonumber(ARGV[2])
local requests = tonumber(ARGV[3])
local out = {}
local i = 4
for r = 1, requests do
  local key, limit, excluded = ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
  local exclude = {}
  for x = 1, excluded do
    exclude[ARGV[i + 2 + x]] = true
  end
  i = i + 3 + excluded
  local kkey = P .. "k:" .. key
  local taken = 0
  local cursor = "-inf"
  while taken < limit do
    local ids = redis.call("ZRANGEBYSCORE", kkey, cursor, "+inf", "LIMIT", 0, 128)
    if #ids == 0 then break end
    for _, id in ipairs(ids) do
      cursor = "(" .. id
      local fields = redis.call("HMGET", P .. "m:" .. id, "c", "e", "p")
      local channel, expires_at = fields[1], fields[2]
      if not channel then
        redis.call("ZREM", kkey, id)
      elseif tonumber(expires_at) <= now then
        drop(id, channel, key)
      elseif not exclude[channel] then
        out[#out + 1] = channel
        out[#out + 1] = key
        out[#out + 1] = fields[3]
        out[#out + 1] = expires_at
        drop(id, channel, key)
        taken = taken + 1
        if taken >= limit then break end
      end
    end
  end
end
if #out > 0 then receipt_keep(out) end
return out
"""
)

#: KEYS: a receipt. Returns its reply (``done`` first) if its script ran, else an empty list,
#: leaving a tombstone so that the script, should it still arrive, does nothing.
RECOVER = (
    _PRELUDE
    + """
local kept = redis.call("LRANGE", KEYS[1], 0, -1)
if #kept == 0 then
  redis.call("RPUSH", KEYS[1], "cancelled")
  redis.call("PEXPIRE", KEYS[1], RECEIPT_TTL_MS)
  return {}
end
if kept[1] == "done" then
  redis.call("DEL", KEYS[1])
  return kept
end
return {}
"""
)

#: ARGV: prefix, group, channel, key, expires_at.
GROUP_ADD = (
    _PRELUDE
    + """
local group, channel, key, expires_at = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local gk = P .. "gk:" .. group
local member = enc(group, channel)
local previous = redis.call("HGET", gk, channel)
if previous and previous ~= key then
  redis.call("SREM", P .. "km:" .. previous, member)
end
redis.call("ZADD", P .. "g:" .. group, expires_at, channel)
redis.call("HSET", gk, channel, key)
redis.call("ZADD", P .. "ge", expires_at, member)
redis.call("SADD", P .. "km:" .. key, member)
return 1
"""
)

#: ARGV: prefix, group, channel.
GROUP_DISCARD = (
    _PRELUDE
    + """
drop_member(ARGV[2], ARGV[3])
return 1
"""
)

#: ARGV: prefix, now, budget. Removes at most about ``budget`` expired messages and memberships
#: (so one call never blocks the server for long) and returns how many went away.
PURGE = (
    _PRELUDE
    + """
local now = ARGV[2]
local budget = tonumber(ARGV[3])
local removed = 0
while removed < budget do
  local ids = redis.call("ZRANGEBYSCORE", P .. "e", "-inf", now, "LIMIT", 0, 256)
  if #ids == 0 then break end
  for _, id in ipairs(ids) do
    local fields = redis.call("HMGET", P .. "m:" .. id, "c", "k")
    drop(id, fields[1], fields[2])
    removed = removed + 1
  end
end
while removed < budget do
  local members = redis.call("ZRANGEBYSCORE", P .. "ge", "-inf", now, "LIMIT", 0, 256)
  if #members == 0 then break end
  for _, member in ipairs(members) do
    local group, channel = dec(member)
    drop_member(group, channel)
    removed = removed + 1
  end
end
-- Expired leases stay: heartbeat() must still find them to reap what their process left.
return removed
"""
)

#: ARGV: prefix, process key, expires_at, now. Returns the reaped process keys.
HEARTBEAT = (
    _PRELUDE
    + """
local me, expires_at, now = ARGV[2], ARGV[3], ARGV[4]
redis.call("ZADD", P .. "l", expires_at, me)
local reaped = {}
for _, key in ipairs(redis.call("ZRANGEBYSCORE", P .. "l", "-inf", now)) do
  if key ~= me then
    forget(key)
    reaped[#reaped + 1] = key
  end
end
return reaped
"""
)

#: ARGV: prefix, process key.
RELEASE = (
    _PRELUDE
    + """
forget(ARGV[2])
return 1
"""
)
