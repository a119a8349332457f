-- Shared prelude of every queue script (RedisStorage prepends common.lua and this file to each
-- operation's file, so each operation is still one script, loaded once and run atomically).
--
-- KEYS[1..21]  the queue:  meta (hash), seq (counter), ids (hash request id -> member),
--              body (hash member -> serialised request), state (hash member -> msgpack),
--              vis0..vis3 (zsets per priority: score enqueued_at in us, member), inflight
--              (zset: score visibility deadline in us, member), copies (hash request id ->
--              live copies beyond the first: a dead-letter queue keeps every copy it is sent),
--              then the ranking index of the global choice (see "The ranking index" below):
--              lanes, tenants, aging:2, aging:3, urgent, usage, charges, charge, recent-urgent,
--              recent
-- KEYS[22..42] the dead-letter queue, same layout (absent without one)
-- KEYS[last]   only for calls that change a message (#KEYS % 21 is then 1): where this call's
--              reply is kept for a resend (common.lua). The global choice's scripts pass the
--              limiter's keys after the queues' (#KEYS % 21 is then 5 or 6: see global_*.lua).
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
local NOW_TEXT = fmt(NOW) -- (made once: maintain(), touch() and replies stamp it)
local NONCE = ARGV[2]
local MAX_RECEIVES = tonumber(ARGV[3])
local RETENTION = tonumber(ARGV[4])

local WIDTH = 21 -- keys per queue
local function queue_keys(base)
  return {
    meta = KEYS[base], seq = KEYS[base + 1], ids = KEYS[base + 2], body = KEYS[base + 3],
    state = KEYS[base + 4],
    vis = {KEYS[base + 5], KEYS[base + 6], KEYS[base + 7], KEYS[base + 8]},
    inflight = KEYS[base + 9], copies = KEYS[base + 10],
    lanes = KEYS[base + 11], tenants = KEYS[base + 12], aging = {KEYS[base + 13], KEYS[base + 14]},
    urgent = KEYS[base + 15], usage = KEYS[base + 16], charges = KEYS[base + 17], charge = KEYS[base + 18],
    recent_urgent = KEYS[base + 19], recent = KEYS[base + 20],
    -- The score policy's index (score_index.lua): named after the queue's meta key, in its slot.
    sc_members = string.sub(KEYS[base], 1, -5) .. 'score:members',
    sc_ages = string.sub(KEYS[base], 1, -5) .. 'score:ages',
    sc_classes = string.sub(KEYS[base], 1, -5) .. 'score:classes',
    sc_cells = string.sub(KEYS[base], 1, -5) .. 'score:cells',
    sc_heads = string.sub(KEYS[base], 1, -5) .. 'score:heads',
  }
end

local Q = queue_keys(1)
local DLQ = nil
if #KEYS >= 2 * WIDTH then
  DLQ = queue_keys(WIDTH + 1)
end
local QUEUE_KEYS = WIDTH -- the queues' keys: those after them are the call's own
if DLQ ~= nil then
  QUEUE_KEYS = 2 * WIDTH
end
local REPLY = nil
if #KEYS % WIDTH == 1 then
  REPLY = KEYS[#KEYS]
end

-- Fresh identifiers for this call: 128 bits each, derived from the client's random seed.
local fresh_count = 0
local function fresh()
  fresh_count = fresh_count + 1
  return string.sub(redis.sha1hex(NONCE .. ':' .. (SMALL_TEXT[fresh_count] or fresh_count)), 1, 32)
end

-- state: priority, enqueued_at, receive_count, first_received_at (-1: never), token ('' before
-- the first receive), message id, request id, then what the ranking index needs: tenant,
-- estimated tokens, deadline in us (-1: none), input and output tokens (-1: not given), the
-- expected processing time in seconds (-1: not given). (A message stored by a version without
-- these has ten == nil: it is not in the index; one stored before the parts has inp == nil: its
-- limiter reservation counts the whole estimate; one stored before the processing time has
-- ept == nil: the score policy counts it as not given.) state_of reads one as stored (nil for
-- none: the HGET or HMGET of a member without one), load reads a member's.
local function state_of(raw)
  if not raw then
    return nil
  end
  local p, at, rc, first, token, mid, rid, ten, tok, dl, inp, out, ept = cmsgpack.unpack(raw)
  return {
    p = p, at = at, rc = rc, first = first, token = token, mid = mid, rid = rid, ten = ten, tok = tok, dl = dl,
    inp = inp, out = out, ept = ept,
  }
end

local function load(q, member)
  return state_of(redis.call('HGET', q.state, member))
end

-- A state as save() stores it (its fields as far as the message has them).
local function packed_state(s)
  if s.ten == nil then
    return cmsgpack.pack(s.p, s.at, s.rc, s.first, s.token, s.mid, s.rid)
  elseif s.inp == nil then
    return cmsgpack.pack(s.p, s.at, s.rc, s.first, s.token, s.mid, s.rid, s.ten, s.tok, s.dl)
  elseif s.ept ~= nil then
    return cmsgpack.pack(s.p, s.at, s.rc, s.first, s.token, s.mid, s.rid, s.ten, s.tok, s.dl, s.inp, s.out, s.ept)
  end
  return cmsgpack.pack(s.p, s.at, s.rc, s.first, s.token, s.mid, s.rid, s.ten, s.tok, s.dl, s.inp, s.out)
end

local function save(q, member, s)
  redis.call('HSET', q.state, member, packed_state(s))
end

-- The ranking index of the global choice (global_dispatch.lua), kept by every script as a
-- message becomes visible or stops being visible:
--   lanes    one sorted set, every score 0, ordered by member: <len>:<tenant><lane><deadline>
--            <member><tokens>, so a tenant's first message (lane, then earliest deadline, then
--            oldest) is one ZRANGEBYLEX, its estimate read from the entry. Lanes: 0 URGENT,
--            1 HIGH, 2 aged, 3 NORMAL, 4 LOW; deadline in us, 16 digits (9...9: none). The
--            length prefix keeps tenants apart.
--   tenants  hash: tenant -> its visible messages (a tenant with none is not there)
--   aging:2, aging:3  NORMAL and LOW messages not aged yet: score enqueued_at, member
--   urgent   URGENT messages: score enqueued_at, member (URGENT first, oldest first)
--   usage, charges, charge   tenant token use over the fairness window (global_dispatch.lua)
--   recent-urgent  the estimates of the last 64 URGENT messages that became visible (the
--            automatic URGENT reserve); recent: of the last 256 dispatched (the tenant reserve)
--   meta fields 'waiting' (the estimates of the visible messages in the index, summed: a float,
--   as estimates below 2^53 each may pass a 64-bit integer together, which failed the script
--   midway) and
--   'arrival' (the latest enqueued_at of a message that became visible): when a backlog clears
--   the reserves are not kept (global_dispatch.lua)
--
-- The score policy's index (score_index.lua) is kept while meta 'scored' (it is whole: set when a
-- queue is created, or when a fill ends) or 'scoring' is set (a process of the score policy
-- dispatches from the queue: score_start.lua, run before its first dispatch and before a fill).
-- The first fair_priority dispatch of a queue without 'scoring' drops it (global_dispatch.lua):
-- a queue only fair_priority serves stops paying for it, about a quarter of a dispatch's server
-- time; a process of the score policy that comes later fills it again (score_fill.lua).
local function score_kept(q)
  if q.score_kept == nil then
    local flags = redis.call('HMGET', q.meta, 'scored', 'scoring')
    q.score_kept = flags[1] == '1' or flags[2] == '1'
  end
  return q.score_kept
end

local NO_DEADLINE = '9999999999999999'
local NATIVE_LANE = {'0', '1', '3', '4'}

-- A tenant's prefix in the lanes' entries (<len>:<tenant>) and an estimate as text, each made once
-- per run of a script for the tenants and estimates it meets (a number made text is a formatted
-- print): a dispatch of many winners, an enqueue of many messages meet the same few again.
local tenant_prefixes, token_texts = {}, {}

local function tenant_prefix(tenant)
  local prefix = tenant_prefixes[tenant]
  if prefix == nil then
    prefix = #tenant .. ':' .. tenant
    tenant_prefixes[tenant] = prefix
  end
  return prefix
end

local function tokens_text(n)
  local text = token_texts[n]
  if text == nil then
    text = fmt(n)
    if n > 0 and n % 1 == 0 then -- (never a NaN key, nor -0, whose text is not 0's)
      token_texts[n] = text
    end
  end
  return text
end

local function lane_key(member, s, lane)
  local dl = NO_DEADLINE
  if s.dl >= 0 then
    dl = string.format('%016d', math.min(s.dl, 9999999999999998))
  end
  return tenant_prefix(s.ten) .. lane .. dl .. member .. tokens_text(s.tok)
end

local function index_add(q, member, s)
  if s.ten == nil then
    return
  end
  if score_kept(q) then
    score_index_add(q, member, s)
  end
  redis.call('ZADD', q.lanes, ZERO, lane_key(member, s, NATIVE_LANE[s.p + 1]))
  redis.call('HINCRBY', q.tenants, s.ten, ONE)
  redis.call('HINCRBYFLOAT', q.meta, 'waiting', tokens_text(s.tok))
  local arrival = tonumber(redis.call('HGET', q.meta, 'arrival'))
  if arrival == nil or s.at > arrival then
    redis.call('HSET', q.meta, 'arrival', fmt(s.at))
  end
  if s.p == 0 then
    redis.call('LPUSH', q.recent_urgent, tokens_text(s.tok))
    redis.call('LTRIM', q.recent_urgent, 0, 63)
    redis.call('ZADD', q.urgent, fmt(s.at), member)
  elseif s.p >= 2 then
    redis.call('ZADD', q.aging[s.p - 1], fmt(s.at), member)
  end
end

-- What index_remove() takes off the visible estimates' sum ('waiting') and the tenants' counts,
-- when a script defers it (index_defer(): global_dispatch.lua, whose rounds remove many messages
-- of a few tenants): applied by index_flush() in one command each, before anything reads them.
local index_pending = nil

local function index_defer()
  index_pending = {waiting = 0, tenants = {}, order = {}}
end

local function index_flush()
  local pending = index_pending
  if pending == nil then
    return
  end
  index_defer() -- taken first: a flush that fails midway is never applied twice
  if pending.waiting ~= 0 then
    redis.call('HINCRBYFLOAT', Q.meta, 'waiting', fmt(-pending.waiting))
  end
  local order = pending.order
  if #order == 1 then
    if redis.call('HINCRBY', Q.tenants, order[1], -pending.tenants[order[1]]) <= 0 then
      redis.call('HDEL', Q.tenants, order[1])
    end
  elseif #order > 1 then
    -- Read and written in one command each (the script is atomic: what HINCRBY would do).
    local counts = redis.call('HMGET', Q.tenants, unpack(order))
    local kept, dropped = {}, {}
    -- Bounded by the tenants of the messages removed since the last flush.
    for i, tenant in ipairs(order) do
      local left = (tonumber(counts[i]) or 0) - pending.tenants[tenant]
      if left > 0 then
        kept[#kept + 1] = tenant
        kept[#kept + 1] = fmt(left)
      else
        dropped[#dropped + 1] = tenant
      end
    end
    if #kept > 0 then
      redis.call('HSET', Q.tenants, unpack(kept))
    end
    if #dropped > 0 then
      redis.call('HDEL', Q.tenants, unpack(dropped))
    end
  end
end

-- A message of state `s` taken out of the lanes: out of the visible estimates' sum and its
-- tenant's count too (or counted for index_flush(), when deferred).
local function index_uncount(q, s)
  if index_pending ~= nil and q == Q then
    local pending = index_pending
    local tokens = s.tok
    if tokens % 1 ~= 0 then
      tokens = tonumber(fmt(tokens)) -- (a whole number is its own fmt() read back)
    end
    pending.waiting = pending.waiting + tokens
    if pending.tenants[s.ten] == nil then
      pending.tenants[s.ten] = 0
      pending.order[#pending.order + 1] = s.ten
    end
    pending.tenants[s.ten] = pending.tenants[s.ten] + 1
  else
    if s.tok ~= 0 then
      redis.call('HINCRBYFLOAT', q.meta, 'waiting', fmt(-s.tok))
    end
    if redis.call('HINCRBY', q.tenants, s.ten, -1) <= 0 then
      redis.call('HDEL', q.tenants, s.ten)
    end
  end
end

local function index_remove(q, member, s)
  if s.ten == nil then
    return
  end
  if score_kept(q) then
    score_index_remove(q, member, s)
  end
  local removed = redis.call('ZREM', q.lanes, lane_key(member, s, NATIVE_LANE[s.p + 1]))
  if s.p == 0 then
    redis.call('ZREM', q.urgent, member)
  elseif s.p >= 2 then
    if redis.call('ZREM', q.aging[s.p - 1], member) == 0 then
      removed = redis.call('ZREM', q.lanes, lane_key(member, s, '2')) -- it had aged
    end
  end
  if removed == 1 then
    index_uncount(q, s)
  end
end

-- Adds a member to the visible set of its priority, and to the index.
local function show(q, member, s)
  redis.call('ZADD', q.vis[s.p + 1], fmt(s.at), member)
  index_add(q, member, s)
end

-- Removes a member from the visible set of its priority (and the index); whether it was there.
local function hide(q, member, s)
  if redis.call('ZREM', q.vis[s.p + 1], member) == 1 then
    index_remove(q, member, s)
    return true
  end
  return false
end

-- A queue this version creates keeps every message in the ranking indexes from the start: its meta
-- says so ('indexed', 'scored'; see score_kept for when the score policy's is dropped). One created before the index existed has no such field: the global choice
-- indexes it first (index_scan.lua, index_fill.lua).
local function created(q)
  if redis.call('HSETNX', q.meta, 'created', fmt(CREATED)) == 1 then
    redis.call('HSET', q.meta, 'indexed', '1')
    redis.call('HSET', q.meta, 'scored', '1')
  end
end

local function touch(q)
  created(q)
  redis.call('HSET', q.meta, 'modified', NOW_TEXT)
end

-- The request id stays taken while another copy of it lives (only dead-letter queues hold
-- copies); `ids` then names one copy, or one gone: it is used only to refuse duplicates.
local function forget(q, member, s)
  if q.copies_none == nil then
    -- Read once per script: only dead_letter() adds copies (to the dead-letter queue).
    q.copies_none = redis.call('EXISTS', q.copies) == 0
  end
  if not q.copies_none and redis.call('HEXISTS', q.copies, s.rid) == 1 then
    if redis.call('HINCRBY', q.copies, s.rid, -1) <= 0 then
      redis.call('HDEL', q.copies, s.rid)
    end
  else
    redis.call('HDEL', q.ids, s.rid)
  end
  redis.call('HDEL', q.body, member)
  redis.call('HDEL', q.state, member)
end

-- A new visible message in q; returns its member and state. `index` carries tenant, tokens,
-- deadline, input and output tokens (nil: a message not in the index).
local function insert(q, rid, p, at, body, mid, index)
  local member = string.format('%015d', redis.call('INCR', q.seq))
  local s = {p = p, at = at, rc = 0, first = -1, token = '', mid = mid, rid = rid}
  if index ~= nil then
    s.ten, s.tok, s.dl, s.inp, s.out, s.ept = index.ten, index.tok, index.dl, index.inp, index.out, index.ept
  end
  redis.call('HSET', q.ids, rid, member)
  redis.call('HSET', q.body, member, body)
  save(q, member, s)
  show(q, member, s)
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
      DLQ.copies_none = false
    end
    local index = nil
    if s.ten ~= nil then
      index = {ten = s.ten, tok = s.tok, dl = s.dl, inp = s.inp, out = s.out, ept = s.ept}
    end
    -- Created first: a queue created marks its score index whole, so the message must be
    -- written to it (score_kept reads the marks).
    created(DLQ)
    insert(DLQ, s.rid, s.p, s.at, body, fresh(), index)
    touch(DLQ)
    if index == nil then
      redis.call('HDEL', DLQ.meta, 'indexed') -- a message from before the index: index it again
    end
  end
end

-- The most messages one call returns, dead-letters or expires (maintain). A call's work must
-- not grow with the number of messages due at one instant: 300,000 messages expiring together
-- held Redis 0.87 s in one script, and about two million would pass its 5 s script limit (BUSY
-- for every client of the server). The rest is left to the next calls, this many each;
-- meanwhile every reader skips a message past the retention period (LIVE_MIN) and counts it as
-- expired (pending_expired), and a message whose visibility ended counts as in flight until a
-- call returns it.
local MAINTAIN_BATCH = 1000
local MAINTAIN_BATCH_TEXT = '1000' -- (its text: see ZERO in common.lua)

-- The lowest enqueued_at (us) of a message not past the retention period: a message is expired
-- when NOW - enqueued_at > RETENTION, that is, enqueued_at < LIVE_MIN. '-inf' without retention.
local LIVE_MIN = '-inf'
if RETENTION > 0 then
  LIVE_MIN = fmt(NOW - RETENTION)
end
local LIVE_BEFORE = '(' .. LIVE_MIN -- (made once: maintain() asks each priority)

-- Up to `limit` visible messages of priority index p (1..4) not past the retention period,
-- oldest first.
local function live_range(p, limit)
  return redis.call('ZRANGEBYSCORE', Q.vis[p], LIVE_MIN, '+inf', 'LIMIT', 0, limit)
end

-- The visible messages of priority index p (1..4) not past the retention period.
local function live_count(p)
  return redis.call('ZCOUNT', Q.vis[p], LIVE_MIN, '+inf')
end

-- Visible messages past the retention period that no call has dropped yet (MAINTAIN_BATCH):
-- expired already, counted so, never delivered nor counted as visible.
local function pending_expired()
  if RETENTION == 0 then
    return 0
  end
  local n = 0
  for p = 1, 4 do -- the four priorities
    n = n + redis.call('ZCOUNT', Q.vis[p], '-inf', '(' .. LIVE_MIN)
  end
  return n
end

-- A submitter waiting for a request the store itself ends (its receives used up, its retention
-- passed) hears how it ended, as `RedisRelay` would tell it (redis/outcomes.py): the entry of
-- `{ns}:q:{q}:waiting` names its process's inbox, and the outcome is pushed there. Without an
-- entry (nobody submitted it, or its outcome was told already) nothing happens.
local RESULT_TTL = 300 -- redis/outcomes.py RESULT_TTL
local function report_ended(q, rid, error_type, message, fields)
  local waiting = string.gsub(q.meta, ':meta$', ':waiting')
  local inbox = redis.call('HGET', waiting, rid)
  if not inbox then
    return
  end
  redis.call('HDEL', waiting, rid)
  if inbox == 'withdrawn' then
    return
  end
  local error = fields or {}
  error.type, error.message = 'llm_queue_dispatcher.errors.' .. error_type, message
  local body = cjson.encode({ok = false, error = error})
  redis.call('RPUSH', inbox, string.len(rid) .. ':' .. rid .. body)
  redis.call('EXPIRE', inbox, RESULT_TTL)
end

local function report_expired(q, rid)
  report_ended(q, rid, 'ExpiredError', 'request ' .. rid .. ' expired: its message retention period passed')
end

-- What maintain() does to one message whose visibility ended: it expires (past the retention
-- period), is dead-lettered (its receives used up) or becomes visible again. Returns whether it
-- is gone from the queue.
local function visibility_ended(member, s)
  redis.call('ZREM', Q.inflight, member)
  if RETENTION > 0 and NOW - s.at > RETENTION then
    forget(Q, member, s)
    redis.call('HINCRBY', Q.meta, 'expired', 1)
    report_expired(Q, s.rid)
    return true
  elseif MAX_RECEIVES > 0 and s.rc >= MAX_RECEIVES then
    dead_letter(member, s)
    report_ended(Q, s.rid, 'MessageStateError', 'request ' .. s.rid .. ' was dead-lettered: its '
      .. s.rc .. ' receives were used up without a mark')
    return true
  end
  show(Q, member, s)
  return false
end

-- SQS's rules applied lazily, so no background task is needed: in-flight messages whose
-- visibility ran out return (or expire, or are dead-lettered), then visible messages past the
-- retention period expire, oldest first, at most MAINTAIN_BATCH in all. Returns whether
-- anything changed.
local function maintain()
  local changed = false
  local due = redis.call('ZRANGEBYSCORE', Q.inflight, '-inf', NOW_TEXT, 'LIMIT', ZERO, MAINTAIN_BATCH_TEXT)
  -- Bounded by MAINTAIN_BATCH (the LIMIT above).
  for _, member in ipairs(due) do
    visibility_ended(member, load(Q, member))
    changed = true
  end
  local budget = MAINTAIN_BATCH - #due
  if RETENTION > 0 then
    for p = 1, 4 do -- the four priorities
      if budget <= 0 then
        break
      end
      local old = redis.call(
        'ZRANGEBYSCORE', Q.vis[p], '-inf', LIVE_BEFORE, 'LIMIT', ZERO,
        budget == MAINTAIN_BATCH and MAINTAIN_BATCH_TEXT or budget
      )
      -- Bounded by MAINTAIN_BATCH (the LIMIT above).
      for _, member in ipairs(old) do
        local s = load(Q, member)
        index_remove(Q, member, s)
        forget(Q, member, s)
        report_expired(Q, s.rid)
      end
      if #old > 0 then
        -- The oldest of the set: exactly the ranks just read.
        redis.call('ZREMRANGEBYRANK', Q.vis[p], 0, #old - 1)
        redis.call('HINCRBY', Q.meta, 'expired', #old)
        budget = budget - #old
        changed = true
      end
    end
  end
  if changed then
    touch(Q)
  else
    created(Q)
  end
  return changed
end

-- Applies to one message now what maintain() would, had its bound let it reach the message: one
-- whose visibility ended is handled so, one visible past the retention period expires. Returns
-- whether the message is gone from the queue. `deadline` (optional): its in-flight deadline as
-- ZSCORE answers it (false: not in flight), when the caller read it already.
local function catch_up(member, s, deadline)
  if deadline == nil then
    deadline = redis.call('ZSCORE', Q.inflight, member)
  end
  if deadline then
    return tonumber(deadline) <= NOW and visibility_ended(member, s)
  end
  if RETENTION > 0 and NOW - s.at > RETENTION then
    hide(Q, member, s)
    forget(Q, member, s)
    redis.call('HINCRBY', Q.meta, 'expired', 1)
    report_expired(Q, s.rid)
    return true
  end
  return false
end

-- The current holder's message: the member's state when `token` is its latest receipt token
-- (and the message is still in the queue). `raw` and `deadline` (optional): its stored state
-- (false: none) and in-flight deadline, when the caller read them already (global_mark.lua).
local function holder(member, token, raw, deadline)
  local s
  if raw == nil then
    s = load(Q, member)
  else
    s = state_of(raw)
  end
  if s == nil or s.token == '' or s.token ~= token or catch_up(member, s, deadline) then
    return nil
  end
  return s
end

local function leave_current_set(member, s)
  if redis.call('ZREM', Q.inflight, member) == 0 then
    hide(Q, member, s)
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
  show(Q, member, s)
end

-- Appends a received message's reply fields to `out`: member, message id, receive count,
-- enqueued_at, first_received_at, receipt token, serialised request (dequeue.lua and the global
-- dispatch scripts reply alike). With `body_later`, the request's place holds false, for the
-- caller to fill in (dispatch_common.lua's leases_flush()).
local function received(out, member, s, body_later)
  out[#out + 1] = member
  out[#out + 1] = s.mid
  out[#out + 1] = s.rc
  out[#out + 1] = s.at
  out[#out + 1] = s.first
  out[#out + 1] = s.token
  out[#out + 1] = not body_later and redis.call('HGET', Q.body, member)
end

-- One receive more of state `s`: its count, its first receive, a fresh receipt token.
local function receive(s)
  s.rc = s.rc + 1
  if s.first < 0 then
    s.first = NOW
  end
  s.token = fresh()
end

-- Leases a message already out of the visible sets for `timeout` us: one receive more, a fresh
-- receipt token, in flight until then. Its reply fields go to `out` and (member, token) to
-- `taken`, what a resent call answers with (`replayed`).
local function lease(out, taken, member, s, timeout)
  receive(s)
  save(Q, member, s)
  redis.call('ZADD', Q.inflight, fmt(NOW + timeout), member)
  received(out, member, s)
  taken[#taken + 1] = member
  taken[#taken + 1] = s.token
end

-- A resent call (its reply lost; the first run `remember`ed its `taken` under `reply_key`)
-- answers as that run did: the messages it received that are still in flight under the receipt
-- tokens it gave them, appended to `out`, and receives no others (a receive whose reply was lost
-- leaves nothing leased to nobody). Returns whether this call is such a resend.
local function replayed(out, reply_key)
  local kept = recalled(reply_key)
  if kept == nil then
    return false
  end
  -- Bounded by the messages the first run received (member, token pairs).
  for i = 1, #kept, 2 do
    local s = holder(kept[i], kept[i + 1])
    if s ~= nil and redis.call('ZSCORE', Q.inflight, kept[i]) then
      received(out, kept[i], s)
    end
  end
  return true
end
