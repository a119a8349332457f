-- Shared prelude of every queue script (RedisStorage prepends common.lua and this file to each
-- operation's file, so each operation is still one script, loaded once and run atomically).
--
-- KEYS[1..11]  the queue:  meta (hash), seq (counter), ids (hash request id -> member),
--              body (hash member -> serialised request), state (hash member -> msgpack),
--              vis0..vis3 (zsets per priority: score enqueued_at in us, member), inflight
--              (zset: score visibility deadline in us, member), copies (hash request id ->
--              live copies beyond the first: a dead-letter queue keeps every copy it is sent)
-- KEYS[12..22] the dead-letter queue, same layout (absent without one)
-- KEYS[last]   only for calls that change a message (#KEYS is then 12 or 23): where this call's
--              reply is kept for a resend (common.lua)
-- ARGV[1] ""  in production: every instant comes from the server's TIME. Only the test suite's
--             private subclass passes "<now_us> <created_us>" (see tests/redis/support.py).
-- ARGV[2] 128 random bits (hex) the client draws once per call: the seed of this call's receipt
--         tokens and message ids (Redis scripts have no usable randomness of their own), and the
--         name of its reply key.
-- ARGV[3] max_receive_count (0: none)   ARGV[4] message retention in us (0: forever)
-- ARGV[5..] the operation's own arguments.
--
-- A member is the message's sequence number, zero-padded to 15 digits, so members that share a
-- score (one enqueue instant) sort in enqueue order. Scripts that report instants also return
-- NOW, the server's instant, so the client can tell how far its own clock is from it.

local function server_now()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end

local NOW, CREATED
if ARGV[1] == '' then
  NOW = server_now()
  CREATED = NOW
else
  local now, created = string.match(ARGV[1], '^(%d+) (%d+)$')
  NOW, CREATED = tonumber(now), tonumber(created)
end
local NONCE = ARGV[2]
local MAX_RECEIVES = tonumber(ARGV[3])
local RETENTION = tonumber(ARGV[4])

local function queue_keys(base)
  return {
    meta = KEYS[base], seq = KEYS[base + 1], ids = KEYS[base + 2], body = KEYS[base + 3],
    state = KEYS[base + 4],
    vis = {KEYS[base + 5], KEYS[base + 6], KEYS[base + 7], KEYS[base + 8]},
    inflight = KEYS[base + 9], copies = KEYS[base + 10],
  }
end

local Q = queue_keys(1)
local DLQ = nil
if #KEYS >= 22 then
  DLQ = queue_keys(12)
end
local REPLY = nil
if #KEYS % 11 == 1 then
  REPLY = KEYS[#KEYS]
end

-- Fresh identifiers for this call: 128 bits each, derived from the client's random seed.
local fresh_count = 0
local function fresh()
  fresh_count = fresh_count + 1
  return string.sub(redis.sha1hex(NONCE .. ':' .. fresh_count), 1, 32)
end

-- state: priority, enqueued_at, receive_count, first_received_at (-1: never), token ('' before
-- the first receive), message id, request id
local function load(q, member)
  local raw = redis.call('HGET', q.state, member)
  if not raw then
    return nil
  end
  local p, at, rc, first, token, mid, rid = cmsgpack.unpack(raw)
  return {p = p, at = at, rc = rc, first = first, token = token, mid = mid, rid = rid}
end

local function save(q, member, s)
  redis.call('HSET', q.state, member, cmsgpack.pack(s.p, s.at, s.rc, s.first, s.token, s.mid, s.rid))
end

local function touch(q)
  redis.call('HSETNX', q.meta, 'created', fmt(CREATED))
  redis.call('HSET', q.meta, 'modified', fmt(NOW))
end

-- The request id stays taken while another copy of it lives (only dead-letter queues hold
-- copies); `ids` then names one copy, or one gone: it is used only to refuse duplicates.
local function forget(q, member, s)
  if redis.call('HEXISTS', q.copies, s.rid) == 1 then
    if redis.call('HINCRBY', q.copies, s.rid, -1) <= 0 then
      redis.call('HDEL', q.copies, s.rid)
    end
  else
    redis.call('HDEL', q.ids, s.rid)
  end
  redis.call('HDEL', q.body, member)
  redis.call('HDEL', q.state, member)
end

-- A new visible message in q; returns its member and state.
local function insert(q, rid, p, at, body, mid)
  local member = string.format('%015d', redis.call('INCR', q.seq))
  local s = {p = p, at = at, rc = 0, first = -1, token = '', mid = mid, rid = rid}
  redis.call('HSET', q.ids, rid, member)
  redis.call('HSET', q.body, member, body)
  save(q, member, s)
  redis.call('ZADD', q.vis[p + 1], fmt(at), member)
  return member, s
end

-- Moves a message that has left Q (already out of its zset) to the dead-letter queue, keeping its
-- original enqueue time; without one it is dropped. Counted in Q's meta either way. The
-- dead-letter queue keeps every copy, even of a request id it already holds (as InMemoryStorage
-- does: dropping one would lose it).
local function dead_letter(member, s)
  local body = redis.call('HGET', Q.body, member)
  forget(Q, member, s)
  redis.call('HINCRBY', Q.meta, 'dead', 1)
  if DLQ ~= nil then
    if redis.call('HEXISTS', DLQ.ids, s.rid) == 1 then
      redis.call('HINCRBY', DLQ.copies, s.rid, 1)
    end
    insert(DLQ, s.rid, s.p, s.at, body, fresh())
    touch(DLQ)
  end
end

-- SQS's rules applied lazily, so no background task is needed: in-flight messages whose
-- visibility ran out return (or expire, or are dead-lettered), then visible messages past the
-- retention period expire. Returns whether anything changed.
local function maintain()
  local changed = false
  local due = redis.call('ZRANGEBYSCORE', Q.inflight, '-inf', fmt(NOW))
  -- Bounded by the messages in flight whose visibility has ended.
  for _, member in ipairs(due) do
    redis.call('ZREM', Q.inflight, member)
    local s = load(Q, member)
    if RETENTION > 0 and NOW - s.at > RETENTION then
      forget(Q, member, s)
      redis.call('HINCRBY', Q.meta, 'expired', 1)
    elseif MAX_RECEIVES > 0 and s.rc >= MAX_RECEIVES then
      dead_letter(member, s)
    else
      redis.call('ZADD', Q.vis[s.p + 1], fmt(s.at), member)
    end
    changed = true
  end
  if RETENTION > 0 then
    local cutoff = '(' .. fmt(NOW - RETENTION)
    for p = 1, 4 do -- the four priorities
      local old = redis.call('ZRANGEBYSCORE', Q.vis[p], '-inf', cutoff)
      -- Bounded by the visible messages past the retention period.
      for _, member in ipairs(old) do
        forget(Q, member, load(Q, member))
        changed = true
      end
      if #old > 0 then
        redis.call('ZREMRANGEBYSCORE', Q.vis[p], '-inf', cutoff)
        redis.call('HINCRBY', Q.meta, 'expired', #old)
      end
    end
  end
  if changed then
    touch(Q)
  else
    redis.call('HSETNX', Q.meta, 'created', fmt(CREATED))
  end
  return changed
end

-- The current holder's message: the member's state when `token` is its latest receipt token.
local function holder(member, token)
  local s = load(Q, member)
  if s == nil or s.token == '' or s.token ~= token then
    return nil
  end
  return s
end

local function leave_current_set(member, s)
  if redis.call('ZREM', Q.inflight, member) == 0 then
    redis.call('ZREM', Q.vis[s.p + 1], member)
  end
end

-- Gives a received message back as if that receive had not happened: visible at once, its
-- receive count one lower (first_received_at forgotten when that receive was the first), its
-- receipt token gone (every handle of it is stale). Never dead-letters: the receive is undone,
-- not used up.
local function give_back(member, s)
  leave_current_set(member, s)
  s.rc = math.max(0, s.rc - 1)
  if s.rc == 0 then
    s.first = -1
  end
  s.token = ''
  save(Q, member, s)
  redis.call('ZADD', Q.vis[s.p + 1], fmt(s.at), member)
end
