-- Shared prelude of every limiter script (RedisThrottle prepends it to each operation's file).
-- The semantics are LLMThrottle's (rust/throttle.rs): two token buckets refilled continuously,
-- all-or-nothing grants, an exact wait, a compensation debt. Shared by every process that names
-- the limiter, on the server's clock.
--
-- KEYS[1] state (hash)   KEYS[2] history (hash request id -> msgpack record)
-- KEYS[3] history order (zset request id by grant instant)
-- ARGV[1] ""  in production: instants come from the server's TIME. Only the test suite's private
--             subclass passes "<now_us>" (see tests/redis/support.py).
-- ARGV[2] rpm  ARGV[3] tpm  ARGV[4] request capacity  ARGV[5] token capacity
-- ARGV[6] history retention in us  ARGV[7] most history records  ARGV[8..] the operation's own.
--
-- Instants are whole microseconds. A bucket stores its level at `last`; its level at any t >= last
-- is computed by level() alone, so the wait a check reports is exactly the one the next grant
-- sees. A provider ceiling (sync_from_headers) stops the refill above it until its reset, and
-- falls with every grant.

local function fmt(n)
  return string.format('%.0f', n)
end

local function exact(n)
  return string.format('%.17g', n)
end

local NOW
if ARGV[1] == '' then
  local t = redis.call('TIME')
  NOW = tonumber(t[1]) * 1000000 + tonumber(t[2])
else
  NOW = tonumber(ARGV[1])
end
local STATE, HISTORY, ORDER = KEYS[1], KEYS[2], KEYS[3]
local RETENTION = tonumber(ARGV[6])
local MAX_RECORDS = tonumber(ARGV[7])
local DEBT_DUST = 1e-9

local raw = redis.call('HMGET', STATE, 'ra', 'rl', 'rc', 'rcu', 'ta', 'tl', 'tc', 'tcu', 'debt', 'penalty',
  'tokens', 'adjusted', 'accuracy')

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
local TOTALS = {tokens = tonumber(raw[11]) or 0, adjusted = tonumber(raw[12]) or 0, accuracy = tonumber(raw[13]) or 0}

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
-- a ceiling below n, the wait runs past the ceiling's end.
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
  while level(b, t) < n do
    t = t + 1
  end
  while t > NOW and level(b, t - 1) >= n do
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
    'accuracy', exact(TOTALS.accuracy),
  }
  if PENALTY > NOW then
    fields[#fields + 1] = 'penalty'
    fields[#fields + 1] = fmt(PENALTY)
  else
    redis.call('HDEL', STATE, 'penalty')
  end
  for _, pair in ipairs({{REQUESTS, 'rc', 'rcu'}, {TOKENS, 'tc', 'tcu'}}) do
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

-- History records: granted at, tokens (estimate, then actual), estimate, actual (-1: none),
-- debt paid on top of the estimate, tokens this grant holds out of the bucket now (what a
-- release gives back), debt its adjustments added (what a release takes back).
local function load_record(request_id)
  local packed = redis.call('HGET', HISTORY, request_id)
  if not packed then
    return nil
  end
  local at, tokens, estimated, actual, debt, held, owed = cmsgpack.unpack(packed)
  return {at = at, tokens = tokens, estimated = estimated, actual = actual, debt = debt, held = held, owed = owed}
end

local function accuracy(r)
  if r.estimated == 0 then
    return 1
  end
  return math.min(r.estimated, r.actual) / math.max(r.estimated, r.actual)
end

local function count_in(r, sign)
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

local function forget_record(request_id, r)
  count_in(r, -1)
  redis.call('HDEL', HISTORY, request_id)
  redis.call('ZREM', ORDER, request_id)
end

local function store_record(request_id, r)
  redis.call('HSET', HISTORY, request_id, cmsgpack.pack(r.at, r.tokens, r.estimated, r.actual, r.debt, r.held, r.owed))
end

-- Drops records older than the retention, then the oldest beyond the record limit.
local function prune()
  local old = redis.call('ZRANGEBYSCORE', ORDER, '-inf', fmt(NOW - RETENTION))
  local excess = redis.call('ZCARD', ORDER) - #old - MAX_RECORDS
  if excess > 0 then
    for _, id in ipairs(redis.call('ZRANGE', ORDER, #old, #old + excess - 1)) do
      old[#old + 1] = id
    end
  end
  for _, id in ipairs(old) do
    forget_record(id, load_record(id))
  end
  return #old
end
