-- Shared prelude of every limiter script (RedisThrottle prepends common.lua and this file to each
-- operation's file). The semantics are LLMThrottle's (rust/throttle/): two token buckets refilled
-- continuously, all-or-nothing grants, an exact wait, a compensation debt, a history of grants.
-- Shared by every process that names the limiter, on the server's clock.
--
-- KEYS[1] state (hash: bucket levels, debt, penalty, ceilings, history totals, grant counter)
-- KEYS[2] grants (hash: grant number -> msgpack record)
-- KEYS[3] grant order (list of grant numbers, oldest first: LLMThrottle's history)
-- KEYS[4] latest (hash: request id -> number of its latest grant that counts)
-- KEYS[5] only for calls that change the books: where this call's reply is kept (common.lua)
-- ARGV[1] ""  in production: instants come from the server's TIME. Only the test suite's private
--             subclass passes "<now_us>" (see tests/redis/support.py).
-- ARGV[2] rpm  ARGV[3] tpm  ARGV[4] request capacity  ARGV[5] token capacity
-- ARGV[6] history retention in us  ARGV[7] most history records  ARGV[8..] the operation's own.
--
-- Instants are whole microseconds. A bucket stores its level at `last`; its level at any t >= last
-- is computed by level() alone, so the wait a check reports is exactly the one the next grant
-- sees. A provider ceiling (sync_from_headers) stops the refill above it until its reset, and
-- falls with every grant.

local NOW
if ARGV[1] == '' then
  local t = redis.call('TIME')
  NOW = tonumber(t[1]) * 1000000 + tonumber(t[2])
else
  NOW = tonumber(ARGV[1])
end
local STATE, GRANTS, ORDER, LATEST, REPLY = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local RETENTION = tonumber(ARGV[6])
local MAX_RECORDS = tonumber(ARGV[7])
local DEBT_DUST = 1e-9
-- Past 2^53 us (the year 2255) doubles no longer hold every microsecond.
local EXACT_US = 2 ^ 53

local raw = redis.call('HMGET', STATE, 'ra', 'rl', 'rc', 'rcu', 'ta', 'tl', 'tc', 'tcu', 'debt', 'penalty',
  'tokens', 'adjusted', 'accuracy', 'live')

local function bucket(avail, last, ceiling, ceiling_until, cap, per_minute)
  local b = {
    avail = tonumber(avail) or cap, last = tonumber(last) or NOW, cap = cap, per_minute = per_minute,
    ceiling = tonumber(ceiling), ceiling_until = tonumber(ceiling_until) or 0,
  }
  if b.avail > cap then
    b.avail = cap -- another process configured a smaller burst
  end
  return b
end

local REQUESTS = bucket(raw[1], raw[2], raw[3], raw[4], tonumber(ARGV[4]), tonumber(ARGV[2]))
local TOKENS = bucket(raw[5], raw[6], raw[7], raw[8], tonumber(ARGV[5]), tonumber(ARGV[3]))
local DEBT = tonumber(raw[9]) or 0
local PENALTY = tonumber(raw[10]) or 0
local TOTALS = {
  tokens = tonumber(raw[11]) or 0, adjusted = tonumber(raw[12]) or 0, accuracy = tonumber(raw[13]) or 0,
  live = tonumber(raw[14]) or 0,
}

-- A penalty or a ceiling stored further ahead than MAX_DELAY_US (by a client that did not bound
-- it) ends a day from now, stored so at once: nothing holds the limiter shut for longer.
if PENALTY > NOW + MAX_DELAY_US then
  PENALTY = NOW + MAX_DELAY_US
  redis.call('HSET', STATE, 'penalty', fmt(PENALTY))
end
for _, pair in ipairs({{REQUESTS, 'rcu'}, {TOKENS, 'tcu'}}) do -- the two buckets
  if pair[1].ceiling ~= nil and pair[1].ceiling_until > NOW + MAX_DELAY_US then
    pair[1].ceiling_until = NOW + MAX_DELAY_US
    redis.call('HSET', STATE, pair[2], fmt(pair[1].ceiling_until))
  end
end

-- The refill of LLMThrottle's TokenBucket (rust/throttle/bucket.rs), in microseconds. Multiply
-- before dividing: whole seconds at whole rates per second come out exact, as in LLMThrottle's
-- float arithmetic, so both limiters draw the same line at the same instant. A ceiling stops
-- the refill above it (never taking away what is there) until its instant; after that the
-- bucket refills freely from where the ceiling held it.
local function refill_to(b, t, limit)
  local elapsed = t - b.last
  if elapsed > 0 then
    local refilled = math.min(b.cap, b.avail + elapsed * b.per_minute / 60000000)
    b.avail = math.min(refilled, math.max(limit, b.avail))
    b.last = t
  end
end

local function refill_until(b, t)
  if b.ceiling ~= nil then
    if t < b.ceiling_until then
      refill_to(b, t, b.ceiling)
      return
    end
    refill_to(b, b.ceiling_until, b.ceiling)
    b.ceiling = nil
  end
  refill_to(b, t, b.cap)
end

local function refill(b)
  refill_until(b, NOW)
end

-- The bucket's level at t >= NOW, computed from its stored state alone (changing nothing): the
-- level a grant at t will find, so the wait a check reports is exactly the one that grant sees.
local function level(b, t)
  local copy = {
    avail = b.avail, last = b.last, cap = b.cap, per_minute = b.per_minute, ceiling = b.ceiling,
    ceiling_until = b.ceiling_until,
  }
  refill_until(copy, t)
  return copy.avail
end

local function available(b)
  return level(b, NOW)
end

-- Microseconds until the bucket holds n: 0 now, math.huge never (n above its capacity). Under
-- a ceiling below n, the wait runs past the ceiling's end. The first guess is the exact refill
-- time rounded up; rounding in level() can leave it a microsecond or two off, which the two
-- loops correct (LLMThrottle's TokenBucket::time_until corrects its own float rounding the same
-- way, in at most 64 rounds). However far the answer (a drained bucket of 1e9 tokens refilling
-- one token a minute waits 1,900 years), it comes at once.
local function wait_for(b, n)
  local now_level = level(b, NOW)
  if now_level >= n then
    return 0
  end
  if n > b.cap then
    return math.huge
  end
  local base, base_level = NOW, now_level
  if b.ceiling ~= nil and b.ceiling_until > NOW and math.max(b.ceiling, now_level) < n then
    base = b.ceiling_until
    base_level = level(b, base)
  end
  local t = base + math.max(0, math.ceil((n - base_level) * 60000000 / b.per_minute))
  if t >= EXACT_US then
    return t - NOW -- centuries away: no microsecond to correct
  end
  -- Bounded: 64 rounds, each adding at least a microsecond.
  for _ = 1, 64 do
    local short = n - level(b, t)
    if short <= 0 then
      break
    end
    t = t + math.max(1, math.ceil(short * 60000000 / b.per_minute))
  end
  -- Bounded: 64 rounds of a microsecond back, to the first instant that holds n.
  for _ = 1, 64 do
    if t <= NOW or level(b, t - 1) < n then
      break
    end
    t = t - 1
  end
  return t - NOW
end

-- Takes up to n from a refilled bucket, lowering its ceiling by n; returns what it could not take.
local function take(b, n)
  local taken = math.max(0, math.min(n, b.avail))
  b.avail = b.avail - taken
  if b.ceiling ~= nil then
    b.ceiling = math.max(0, b.ceiling - n)
  end
  return n - taken
end

-- Gives back n, up to the capacity and a live ceiling (which a refund does not raise: the
-- provider never said it refunds).
local function refund(b, n)
  local limit = b.cap
  if b.ceiling ~= nil then
    limit = math.min(b.cap, math.max(b.ceiling, b.avail))
  end
  b.avail = math.min(b.avail + n, limit)
end

-- Gives back n tokens of debt an upward adjustment added: what is still owed is cancelled, what
-- later grants already paid goes back to the bucket. (Such a payer's own release re-owes what it
-- paid: who paid whose debt is not kept.)
local function give_back_owed(n)
  local cancelled = math.min(DEBT, n)
  DEBT = DEBT - cancelled
  refund(TOKENS, n - cancelled)
end

-- A provider's figure: at most `remaining` now and, with a reset, until then at most
-- `remaining` minus what is granted since. A later figure replaces the ceiling.
local function cap_at(b, remaining, reset)
  b.avail = math.min(b.avail, math.max(remaining, 0))
  if reset ~= nil and NOW + reset > b.last then
    b.ceiling = remaining
    b.ceiling_until = NOW + reset
  else
    b.ceiling = nil
  end
end

-- Tokens a request of `estimated` must find: the estimate plus the debt, but never more than a
-- full bucket (the rest of the debt carries over), as LLMThrottle does.
local function tokens_needed(estimated)
  if estimated > TOKENS.cap then
    return estimated
  end
  return math.min(estimated + DEBT, TOKENS.cap)
end

-- {reason, wait in us} for a request of `estimated` tokens: reason '' when it would be granted.
-- A penalty (a provider's Retry-After) refuses everything, reported as the request limit.
local function check(estimated)
  local request_wait = wait_for(REQUESTS, 1)
  local token_wait = wait_for(TOKENS, tokens_needed(estimated))
  local penalty_wait = math.max(0, PENALTY - NOW)
  local reason = ''
  if penalty_wait > 0 or request_wait > 0 then
    reason = 'rpm_limit'
  elseif token_wait > 0 then
    reason = 'tpm_limit'
  end
  return reason, math.max(request_wait, token_wait, penalty_wait)
end

local function save()
  local fields = {
    'ra', exact(REQUESTS.avail), 'rl', fmt(REQUESTS.last), 'ta', exact(TOKENS.avail), 'tl', fmt(TOKENS.last),
    'debt', exact(DEBT), 'tokens', fmt(TOTALS.tokens), 'adjusted', fmt(TOTALS.adjusted),
    'accuracy', exact(TOTALS.accuracy), 'live', fmt(TOTALS.live),
  }
  if PENALTY > NOW then
    fields[#fields + 1] = 'penalty'
    fields[#fields + 1] = fmt(PENALTY)
  else
    redis.call('HDEL', STATE, 'penalty')
  end
  for _, pair in ipairs({{REQUESTS, 'rc', 'rcu'}, {TOKENS, 'tc', 'tcu'}}) do -- the two buckets
    local b = pair[1]
    if b.ceiling ~= nil then
      fields[#fields + 1] = pair[2]
      fields[#fields + 1] = exact(b.ceiling)
      fields[#fields + 1] = pair[3]
      fields[#fields + 1] = fmt(b.ceiling_until)
    else
      redis.call('HDEL', STATE, pair[2], pair[3])
    end
  end
  redis.call('HSET', STATE, unpack(fields))
end

-- The history: one record per grant, as LLMThrottle keeps it. A record holds: granted at, the
-- request id, tokens (estimate, then actual), estimate, actual (-1: none), debt paid on top of
-- the estimate, tokens this grant holds out of the bucket now (what a release gives back), debt
-- its adjustments added (what a release takes back), the number of the grant of the same id that
-- was latest when it was made ('' for none), and whether it was released (1) or still counts (0).
-- A second grant under one request id is a record of its own: adjust_consumption and release act
-- on the latest, and once that one is released the one before it is the latest again. Released
-- records stay in the order, as LLMThrottle keeps them, until they age out.
local function load_record(number)
  if not number then
    return nil
  end
  local packed = redis.call('HGET', GRANTS, number)
  if not packed then
    return nil
  end
  local at, rid, tokens, estimated, actual, debt, held, owed, previous, released = cmsgpack.unpack(packed)
  return {
    number = number, at = at, rid = rid, tokens = tokens, estimated = estimated, actual = actual, debt = debt,
    held = held, owed = owed, previous = previous, released = released,
  }
end

-- The latest grant of a request id that still counts, or nil.
local function latest_record(request_id)
  return load_record(redis.call('HGET', LATEST, request_id))
end

local function store_record(r)
  redis.call('HSET', GRANTS, r.number, cmsgpack.pack(
    r.at, r.rid, r.tokens, r.estimated, r.actual, r.debt, r.held, r.owed, r.previous, r.released))
end

local function accuracy(r)
  if r.estimated == 0 then
    return 1
  end
  return math.min(r.estimated, r.actual) / math.max(r.estimated, r.actual)
end

local function count_in(r, sign)
  TOTALS.live = TOTALS.live + sign
  TOTALS.tokens = TOTALS.tokens + sign * r.tokens
  if r.actual >= 0 then
    TOTALS.adjusted = TOTALS.adjusted + sign
    TOTALS.accuracy = TOTALS.accuracy + sign * accuracy(r)
  end
  if TOTALS.adjusted <= 0 then
    TOTALS.adjusted = 0
    TOTALS.accuracy = 0 -- float dust must not outlive the records it came from
  end
end

-- A new grant of `request_id`, latest of its id from now on.
local function add_record(request_id, r)
  r.number = fmt(redis.call('HINCRBY', STATE, 'grants', 1))
  r.rid = request_id
  r.previous = redis.call('HGET', LATEST, request_id) or ''
  r.released = 0
  store_record(r)
  redis.call('RPUSH', ORDER, r.number)
  redis.call('HSET', LATEST, request_id, r.number)
  count_in(r, 1)
end

-- Releases the latest grant of its id: it stops counting, and the grant of the same id before it
-- (if it still counts, that is, has not aged out) is the latest again.
local function release_record(r)
  r.released = 1
  store_record(r)
  count_in(r, -1)
  local previous = load_record(r.previous)
  if previous ~= nil and previous.released == 0 then
    redis.call('HSET', LATEST, r.rid, previous.number)
  else
    redis.call('HDEL', LATEST, r.rid)
  end
end

-- Gives a grant back whole, as if it had never been made: its request, the tokens it holds, the
-- debt it paid (owed again), and the debt its adjustments added (cancelled, or given back where
-- later grants paid it). A provider ceiling is not raised by it. `latest`: it is the latest
-- grant of its id, and the one before it becomes the latest again; an earlier grant of an id
-- that has a later one only stops counting.
local function give_back(record, latest)
  refill(REQUESTS)
  refill(TOKENS)
  refund(REQUESTS, 1)
  refund(TOKENS, record.held)
  give_back_owed(record.owed)
  DEBT = DEBT + record.debt
  if DEBT < DEBT_DUST then
    DEBT = 0
  end
  if latest then
    release_record(record)
  else
    record.released = 1
    store_record(record)
    count_in(record, -1)
  end
end

-- Drops the oldest record (LLMThrottle's pop_oldest).
local function pop_oldest()
  local number = redis.call('LPOP', ORDER)
  local r = load_record(number)
  if r == nil then
    return
  end
  if r.released == 0 then
    count_in(r, -1)
  end
  if redis.call('HGET', LATEST, r.rid) == number then
    redis.call('HDEL', LATEST, r.rid)
  end
  redis.call('HDEL', GRANTS, number)
end

-- Drops the records granted at or before NOW - retention (oldest first, stopping at the first
-- younger one), then the oldest beyond the record limit: LLMThrottle's advance. Returns how many.
local function prune()
  local dropped = 0
  local cutoff = NOW - RETENTION
  -- Bounded by the records kept (the list's length when the loop starts).
  for _ = 1, redis.call('LLEN', ORDER) do
    local oldest = load_record(redis.call('LINDEX', ORDER, 0))
    if oldest ~= nil and oldest.at > cutoff then
      break
    end
    pop_oldest()
    dropped = dropped + 1
  end
  -- Bounded by the records beyond the limit.
  for _ = 1, redis.call('LLEN', ORDER) - MAX_RECORDS do
    pop_oldest()
    dropped = dropped + 1
  end
  return dropped
end
