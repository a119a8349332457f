-- Shared prelude of every limiter script (RedisThrottle prepends common.lua and this file to each
-- operation's file). The semantics are LLMThrottle's (rust/throttle/): token buckets refilled
-- continuously (requests and tokens per minute, and where configured input and output tokens per
-- minute and requests and tokens per day), each token bucket with its compensation debt; a limit
-- of requests in flight; all-or-nothing grants, an exact wait, a history of grants. Shared by
-- every process that names the limiter, on the server's clock.
--
-- About 1,445 lines, one file: Redis runs each script as one source, so every limiter operation
-- (and the global choice's scripts, which wrap it) carries this prelude whole; the buckets, the
-- history and the deferred writes of a global script's many grants share its locals. The global
-- scripts' lean session for the common limiter (RPM and TPM alone, below the bucket arithmetic)
-- lives here too: it calls that arithmetic, and it returns before the generic session's
-- definitions run, which is what makes it lean.
--
-- KEYS[1] state (hash: bucket levels, debts, penalty, history totals, grant counter)
-- KEYS[2] grants (hash: grant number -> msgpack record)
-- KEYS[3] grant order (list of grant numbers, oldest first: LLMThrottle's history)
-- KEYS[4] latest (hash: request id -> number of its latest grant that counts)
-- KEYS[5] held (sorted set: grant number -> when granted, for each grant holding a slot of
--         max_concurrent: from its grant until it is adjusted, released or forgotten)
-- KEYS[6] only for calls that change the books: where this call's reply is kept (common.lua)
-- ARGV[1] ""  in production: instants come from the server's TIME. Only the test suite's private
--             subclass passes "<now_us>" (see tests/redis/support.py).
-- ARGV[2] rpm  ARGV[3] tpm  ARGV[4] request capacity  ARGV[5] token capacity
-- ARGV[6] history retention in us  ARGV[7] most history records
-- ARGV[8] itpm  ARGV[9] its capacity  ARGV[10] otpm  ARGV[11] its capacity  ARGV[12] rpd
-- ARGV[13] tpd  ARGV[14] max_concurrent ('' for each limit not configured)
-- ARGV[15..] the operation's own.
--
-- Instants are whole microseconds. A bucket stores its level at `last`; its level at any t >= last
-- is computed by level() alone, so the wait a check reports is exactly the one the next grant
-- sees. A provider's figure (sync_from_headers) lowers a level at once; from there the bucket
-- refills at its own rate, whatever the provider's reset.

local NOW
if ARGV[1] == '' then
  local t = redis.call('TIME')
  NOW = tonumber(t[1]) * 1000000 + tonumber(t[2])
else
  NOW = tonumber(ARGV[1])
end
local STATE, GRANTS, ORDER, LATEST, HELD, REPLY = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local RETENTION = tonumber(ARGV[6])
local MAX_RECORDS = tonumber(ARGV[7])
local MAX_CONCURRENT = tonumber(ARGV[14]) -- nil: requests in flight are not limited
local DEBT_DUST = 1e-9
-- Past 2^53 us (the year 2255) doubles no longer hold every microsecond.
local EXACT_US = 2 ^ 53
local MINUTE_US, DAY_US = 60000000, 86400000000

-- The refill of LLMThrottle's TokenBucket (rust/throttle/bucket.rs), in microseconds. Multiply
-- before dividing: whole seconds at rates per second a double holds exactly (whole rates, or a
-- day's 675 requests: 2^-7 a second) come out exact, as in LLMThrottle's float arithmetic, so both
-- limiters draw the same line at the same instant.
local function refill_until(b, t)
  local elapsed = t - b.last
  if elapsed > 0 then
    b.avail = math.min(b.cap, b.avail + elapsed * b.per / b.period)
    b.last = t
  end
end

local function refill(b)
  refill_until(b, NOW)
end

-- The bucket's level at t >= NOW, computed from its stored state alone (changing nothing): the
-- level a grant at t will find, so the wait a check reports is exactly the one that grant sees.
local function level(b, t)
  -- refill_until's arithmetic on the stored state, with no copy of the bucket made.
  local elapsed = t - b.last
  if elapsed > 0 then
    return math.min(b.cap, b.avail + elapsed * b.per / b.period)
  end
  return b.avail
end

local function available(b)
  return level(b, NOW)
end

-- Microseconds until the bucket holds n: 0 now, math.huge never (n above its capacity). The
-- first guess is the exact refill
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
  local t = NOW + math.max(0, math.ceil((n - now_level) * b.period / b.per))
  if t >= EXACT_US then
    return t - NOW -- centuries away: no microsecond to correct
  end
  -- Bounded: 64 rounds, each adding at least a microsecond.
  for _ = 1, 64 do
    local short = n - level(b, t)
    if short <= 0 then
      break
    end
    t = t + math.max(1, math.ceil(short * b.period / b.per))
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

-- Takes up to n from a refilled bucket; returns what it could not take.
local function take(b, n)
  local taken = math.max(0, math.min(n, b.avail))
  b.avail = b.avail - taken
  return n - taken
end

-- Gives back n, up to the capacity.
local function refund(b, n)
  b.avail = math.min(b.avail + n, b.cap)
end

-- Gives back n tokens of debt an upward adjustment added to token bucket b: what is still owed is
-- cancelled, what later grants already paid goes back to the bucket. (Such a payer's own release
-- re-owes what it paid: who paid whose debt is not kept.)
local function give_back_owed(b, n)
  local cancelled = math.min(b.debt, n)
  b.debt = b.debt - cancelled
  refund(b, n - cancelled)
end

-- Tokens a grant of `tokens` must find in token bucket b: the tokens plus the debt, but never more
-- than a full bucket (the rest of the debt carries over), as LLMThrottle does.
local function needed(b, tokens)
  if tokens > b.cap then
    return tokens
  end
  return math.min(tokens + b.debt, b.cap)
end

-- Moves charge ch of bucket b to `count` (under adjustment `strategy`). Returns nil, or {'warn' | 'compensate', shortfall, debt}.
local function adjust_charge(b, ch, count, strategy)
  local result = nil
  if count > ch.c then
    local extra = count - ch.c
    if available(b) >= extra then
      take(b, extra)
      ch.h = ch.h + extra
    else
      local shortfall = take(b, extra)
      ch.h = ch.h + extra - shortfall
      if strategy == 'compensate' then
        -- At most a full bucket of debt, as LLMThrottle: the provider's own bucket is full again
        -- one window after any use. The rest is never owed, as under 'warn'.
        local owed = math.min(shortfall, math.max(0, b.cap - b.debt))
        b.debt = b.debt + owed
        ch.w = ch.w + owed
        result = {'compensate', shortfall, b.debt}
      else
        result = {'warn', shortfall, b.debt}
      end
    end
  elseif count < ch.c then
    -- A lower count gives back first what an earlier extra left unpaid: under 'warn' it was never
    -- taken; under 'compensate' it became debt (see give_back_owed). Then what the grant holds.
    local lower = ch.c - count
    local never = math.max(0, ch.c + ch.d - ch.h - ch.w)
    lower = lower - math.min(lower, never)
    local owed = math.min(lower, ch.w)
    ch.w = ch.w - owed
    give_back_owed(b, owed)
    lower = lower - owed
    refund(b, lower)
    ch.h = ch.h - lower
  end
  ch.c = count
  return result
end

-- What the history counts (the records that still count, their tokens, the adjusted ones and
-- their accuracy): read with the state (the lean session's or the generic one's, below).
local TOTALS

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

-- The lean session: the global scripts' grants and corrections when the limiter is the common
-- one, RPM and TPM alone (no ITPM, OTPM, RPD, TPD nor max_concurrent sent; no penalty stored
-- beyond MAX_DELAY_US, no earlier version's ceilings stored; for a mark script, no more records
-- kept than MAX_RECORDS), asked for by the global scripts (ARGV.lean: 'one' or 'many', a
-- dispatch for one winner or for several; 'mark'). It does what the generic session below does
-- for these operations, with the same arithmetic (the functions above), and writes the same
-- state, records, order and latest grants: a script of either kind reads what the other wrote.
-- What it leaves out is the generic session's cost per call and per operation: its tables per
-- bucket and per charge, its ~40 definitions, its operations' if-chain, argument copies and
-- pcall, its checkpoints (a lean operation raises before it changes anything, or not at all).
-- Returns nil, LEAN (the operations below); a limiter that is not the common one, or state the
-- generic session must repair, goes on to it.
if ARGV.lean ~= nil and ARGV[8] == '' and ARGV[10] == '' and ARGV[12] == '' and ARGV[13] == ''
  and MAX_CONCURRENT == nil then
  local raw = redis.call(
    'HMGET', STATE, 'penalty', 'tokens', 'adjusted', 'accuracy', 'live', 'ra', 'rl', 'ta', 'tl', 'debt', 'grants', 'rc',
    'rcu', 'tc', 'tcu')
  local penalty = tonumber(raw[1]) or 0
  local order_len = redis.call('LLEN', ORDER)
  if not (raw[12] or raw[13] or raw[14] or raw[15]) and penalty <= NOW + MAX_DELAY_US
    and (ARGV.lean ~= 'mark' or order_len <= MAX_RECORDS) then
    local many = ARGV.lean == 'many'
    local stored_penalty = raw[1] ~= false
    local R = {per = tonumber(ARGV[2]), period = MINUTE_US, cap = tonumber(ARGV[4])}
    R.avail, R.last = tonumber(raw[6]) or R.cap, tonumber(raw[7]) or NOW
    if R.avail > R.cap then
      R.avail = R.cap -- another process configured a smaller burst
    end
    local T = {per = tonumber(ARGV[3]), period = MINUTE_US, cap = tonumber(ARGV[5])}
    T.avail, T.last, T.debt = tonumber(raw[8]) or T.cap, tonumber(raw[9]) or NOW, tonumber(raw[10]) or 0
    if T.avail > T.cap then
      T.avail = T.cap
    end
    TOTALS = {
      tokens = tonumber(raw[2]) or 0, adjusted = tonumber(raw[3]) or 0, accuracy = tonumber(raw[4]) or 0,
      live = tonumber(raw[5]) or 0,
    }
    -- The grant counter (written back only when this call granted, as the generic session's).
    local counter, granted = tonumber(raw[11]) or 0, false
    local save_pending, aged_out = false, false
    -- Records read or changed (number -> packed text, or the record's table once changed; false:
    -- none), the changed ones' numbers in order; the request ids' latest grants (id -> number;
    -- false: none), written through as the generic session's; the new grants, written by flush.
    local known, changed, latest, fresh = {}, {}, {}, {}

    if ARGV.prefetch ~= nil and #ARGV.prefetch > 0 then
      -- The ids the global mark script's marks name (at most MARKS_MAX): their latest grants
      -- and those records, one HMGET each (as the generic session's prefetch).
      local ids = ARGV.prefetch
      local numbers = redis.call('HMGET', LATEST, unpack(ids))
      local named = {}
      for i = 1, #ids do -- the ids just read
        local number = numbers[i]
        latest[ids[i]] = number
        if number and known[number] == nil then
          known[number] = false
          named[#named + 1] = number
        end
      end
      if #named > 0 then
        local packed = redis.call('HMGET', GRANTS, unpack(named))
        for i = 1, #named do -- the records just read
          known[named[i]] = packed[i]
        end
      end
    end

    -- load_record() and store_record() of the generic session (a record's fields and defaults).
    local function record_of(number)
      if not number or number == '' then
        return nil
      end
      local packed = known[number]
      if packed == nil then
        packed = redis.call('HGET', GRANTS, number)
        known[number] = packed
      end
      if not packed or type(packed) == 'table' then
        return packed or nil
      end
      local at, rid, tokens, estimated, actual, debt, held, owed, previous, released, input, output, output_cap, slot,
        charges = cmsgpack.unpack(packed)
      return {
        number = number, at = at, rid = rid, tokens = tokens, estimated = estimated, actual = actual, debt = debt,
        held = held, owed = owed, previous = previous, released = released, input = input or -1, output = output or -1,
        output_cap = output_cap or -1, slot = slot or 0, charges = charges or {},
      }
    end

    local function pack(r)
      return cmsgpack.pack(
        r.at, r.rid, r.tokens, r.estimated, r.actual, r.debt, r.held, r.owed, r.previous, r.released, r.input,
        r.output, r.output_cap, r.slot, r.charges)
    end

    local function record_changed(r)
      if type(known[r.number]) ~= 'table' then
        changed[#changed + 1] = r.number
      end
      known[r.number] = r
    end

    local function latest_of(request_id)
      local number = latest[request_id]
      if number == nil then
        number = redis.call('HGET', LATEST, request_id)
        latest[request_id] = number
      end
      return number or nil
    end

    local function set_latest(request_id, number)
      if number then
        redis.call('HSET', LATEST, request_id, number)
      else
        redis.call('HDEL', LATEST, request_id)
      end
      latest[request_id] = number or false
    end

    -- A slot of max_concurrent held by a record from a time the limiter had one: freed.
    local function free_slot(r)
      if r.slot == 1 then
        redis.call('ZREM', HELD, r.number)
        r.slot = 0
      end
    end

    -- prune()'s first part, once per call: the records granted at or before NOW - retention,
    -- oldest first, dropped as pop_oldest() drops each. A limiter whose oldest record is younger
    -- (a busy one, whose history its record limit caps) reads that one record; else the order's
    -- head is read a chunk at a time (4 records, then twice as many each round up to 512: a few
    -- aged out cost few reads) and the records aged out in it dropped in a few commands for all
    -- of them, not five each.
    local function age_out()
      if aged_out then
        return
      end
      aged_out = true
      local cutoff = NOW - RETENTION
      local first = redis.call('LINDEX', ORDER, ZERO)
      if not first then
        return
      end
      local oldest = record_of(first)
      if oldest ~= nil and oldest.at > cutoff then
        return
      end
      local chunk = 4
      -- Bounded by the records kept: each round but the last drops a whole chunk (at least 4).
      for _ = 1, math.ceil(order_len / 4) do
        local numbers = redis.call('LRANGE', ORDER, 0, chunk - 1)
        local unknown = {}
        for i = 1, #numbers do -- bounded by the chunk
          if known[numbers[i]] == nil then
            unknown[#unknown + 1] = numbers[i]
          end
        end
        if #unknown > 0 then
          local packed = redis.call('HMGET', GRANTS, unpack(unknown))
          for i = 1, #unknown do -- the records just read
            known[unknown[i]] = packed[i]
          end
        end
        local records, count = {}, 0
        for i = 1, #numbers do -- bounded by the chunk: the aged prefix (a missing record is dropped)
          local r = record_of(numbers[i])
          if r ~= nil and r.at > cutoff then
            break
          end
          count = i
          records[i] = r or false
        end
        if count == 0 then
          break
        end
        redis.call('LTRIM', ORDER, count, -1)
        order_len = order_len - count
        local rids, asked = {}, {}
        for i = 1, count do -- the records aged out
          local r = records[i]
          if r and latest[r.rid] == nil and not asked[r.rid] then
            asked[r.rid] = true
            rids[#rids + 1] = r.rid
          end
        end
        if #rids > 0 then
          local found = redis.call('HMGET', LATEST, unpack(rids))
          for i = 1, #rids do -- the ids just read
            latest[rids[i]] = found[i]
          end
        end
        local slots, stale, gone = {}, {}, {}
        for i = 1, count do -- the records aged out, oldest first (pop_oldest()'s order)
          local r, number = records[i], numbers[i]
          if r then
            if r.released == 0 then
              count_in(r, -1)
            end
            if r.slot == 1 then
              slots[#slots + 1] = number
            end
            if latest[r.rid] == number then
              stale[#stale + 1] = r.rid
              latest[r.rid] = false
            end
            gone[#gone + 1] = number
          end
          known[number] = false
        end
        if #slots > 0 then
          redis.call('ZREM', HELD, unpack(slots))
        end
        if #stale > 0 then
          redis.call('HDEL', LATEST, unpack(stale))
        end
        if #gone > 0 then
          redis.call('HDEL', GRANTS, unpack(gone))
        end
        if count < chunk then
          break
        end
        chunk = math.min(2 * chunk, 512)
      end
    end

    local LEAN = {}

    -- check() of the generic session for these two buckets: {reason, wait in us}; `margin`
    -- (optional) tokens the TPM bucket must also keep back.
    function LEAN.check(estimated, margin)
      local best, reason = 0, ''
      local wait = math.max(wait_for(R, 1), penalty - NOW)
      if wait > best then
        best, reason = wait, 'rpm_limit'
      end
      local need = needed(T, estimated)
      if margin ~= nil and margin > 0 then
        need = math.min(need + margin, math.max(T.cap, need))
      end
      wait = wait_for(T, need)
      if wait > best then
        best, reason = wait, 'tpm_limit'
      end
      return reason, best
    end

    -- The global scripts' 'reserve': a grant of `estimated` tokens (its parts `input`, `output`,
    -- nil when not given) to `request_id` if the TPM bucket also holds `need` (the estimate and
    -- the reserves). Returns {1, grant number}, else {0, reason, wait in us}.
    function LEAN.reserve(request_id, estimated, input, output, need)
      local reason, wait = LEAN.check(estimated, need - estimated)
      if reason ~= '' then
        return {0, reason, exact(wait)}
      end
      refill(R)
      take(R, 1)
      refill(T)
      local n = needed(T, estimated)
      take(T, n)
      local applied = math.max(0, n - estimated)
      T.debt = T.debt - applied
      if T.debt < DEBT_DUST then
        T.debt = 0
      end
      counter, granted = counter + 1, true
      local r = {
        number = fmt(counter), at = NOW, rid = request_id, tokens = estimated, estimated = estimated, actual = -1,
        debt = applied, held = n, owed = 0, released = 0, input = input or -1, output = output or -1,
        output_cap = output or -1, slot = 0, charges = {},
      }
      if not many then
        -- A grant alone takes the latest of its id before the history is pruned, as the generic
        -- session's add_record() without deferred drops.
        r.previous = latest_of(request_id) or ''
      end
      fresh[#fresh + 1] = r
      count_in(r, 1)
      age_out()
      save_pending = true
      return {1, r.number}
    end

    -- limiter_adjust.lua's, for the TPM bucket alone: the reply the same.
    function LEAN.adjust(request_id, actual, strategy, input, output)
      age_out()
      save_pending = true
      local r = record_of(latest_of(request_id))
      if r == nil then
        return {'unknown'}
      end
      actual, input, output = tonumber(actual), tonumber(input), tonumber(output)
      if actual == nil then
        error('adjust: the actual tokens are not a number', 0)
      end
      refill(T)
      local ch = {c = r.tokens, d = r.debt, h = r.held, w = r.owed}
      if strategy == 'strict' then
        local extra = actual - ch.c
        if extra > 0 and available(T) < extra then
          return {'strict', exact(wait_for(T, extra)), 'tpm_limit'}
        end
      end
      count_in(r, -1)
      local out = {'ok'}
      local result = adjust_charge(T, ch, actual, strategy)
      r.tokens, r.debt, r.held, r.owed = ch.c, ch.d, ch.h, ch.w
      if result ~= nil then
        out[2], out[3], out[4], out[5] = 'tpm', result[1], exact(result[2]), exact(result[3])
      end
      -- 0 tokens is a refund, not a measured count (limiter_adjust.lua).
      r.actual = actual > 0 and actual or -1
      r.input, r.output = input or -1, output or -1
      free_slot(r)
      count_in(r, 1)
      record_changed(r)
      return out
    end

    -- limiter_release.lua's: the latest grant of the id given back whole (give_back()).
    function LEAN.release(request_id)
      age_out()
      save_pending = true
      local r = record_of(latest_of(request_id))
      if r == nil then
        return 0
      end
      refill(R)
      refund(R, 1)
      refill(T)
      refund(T, r.held)
      give_back_owed(T, r.owed)
      T.debt = T.debt + r.debt
      if T.debt < DEBT_DUST then
        T.debt = 0
      end
      free_slot(r)
      r.released = 1
      record_changed(r)
      count_in(r, -1)
      local previous = record_of(r.previous)
      if previous ~= nil and previous.released == 0 then
        set_latest(r.rid, previous.number)
      else
        set_latest(r.rid, nil)
      end
      return 1
    end

    -- limiter_settle.lua's.
    function LEAN.settle(request_id)
      age_out()
      save_pending = true
      local r = record_of(latest_of(request_id))
      if r == nil then
        return 0
      end
      free_slot(r)
      record_changed(r)
      return 1
    end

    -- The generic session's flush(): the new grants (records_flush), the records changed
    -- (records_write), those beyond MAX_RECORDS dropped (drop_pending), the state (write_state).
    function LEAN.flush()
      if #fresh > 0 then
        local records = fresh
        fresh = {} -- taken first: never written twice
        local unknown, asked = {}, {}
        for i = 1, #records do -- the call's grants (at most WINNERS_MAX)
          local rid = records[i].rid
          if records[i].previous == nil and latest[rid] == nil and not asked[rid] then
            asked[rid] = true
            unknown[#unknown + 1] = rid
          end
        end
        if #unknown > 0 then
          local found = redis.call('HMGET', LATEST, unpack(unknown))
          for i = 1, #unknown do -- the ids just read
            latest[unknown[i]] = found[i]
          end
        end
        local packed, order, latest_fields = {}, {}, {}
        for i = 1, #records do -- the call's grants
          local r = records[i]
          if r.previous == nil then
            r.previous = latest[r.rid] or ''
          end
          latest[r.rid] = r.number
          packed[#packed + 1] = r.number
          packed[#packed + 1] = pack(r)
          order[i] = r.number
          latest_fields[#latest_fields + 1] = r.rid
          latest_fields[#latest_fields + 1] = r.number
        end
        redis.call('HSET', GRANTS, unpack(packed))
        order_len = redis.call('RPUSH', ORDER, unpack(order))
        redis.call('HSET', LATEST, unpack(latest_fields))
      end
      if #changed > 0 then
        local fields = {}
        for i = 1, #changed do -- the records the call's marks changed (at most MARKS_MAX)
          local r = known[changed[i]]
          if type(r) == 'table' then
            fields[#fields + 1] = r.number
            fields[#fields + 1] = pack(r)
            known[r.number] = fields[#fields]
          end
        end
        changed = {}
        if #fields > 0 then
          redis.call('HSET', GRANTS, unpack(fields))
        end
      end
      -- Only a call that granted drops (the generic session's prune() after each grant).
      local n = granted and order_len - MAX_RECORDS or 0
      -- Bounded by the records beyond the limit, 512 per round (drop_pending()'s DROP_CHUNK).
      for _ = 1, math.ceil(n / 512) do
        local numbers = redis.call('LRANGE', ORDER, 0, math.min(n, 512) - 1)
        if #numbers == 0 then
          break
        end
        n = n - #numbers
        redis.call('LTRIM', ORDER, #numbers, -1)
        order_len = order_len - #numbers
        local packed = redis.call('HMGET', GRANTS, unpack(numbers))
        local rids, owners, slots = {}, {}, {}
        for i = 1, #numbers do -- bounded by 512
          if packed[i] then
            local _, rid, tokens, estimated, actual, _, _, _, _, released, _, _, _, slot = cmsgpack.unpack(packed[i])
            if released == 0 then
              count_in({tokens = tokens, estimated = estimated, actual = actual}, -1)
            end
            if slot == 1 then
              slots[#slots + 1] = numbers[i]
            end
            rids[#rids + 1] = rid
            owners[#owners + 1] = numbers[i]
          end
        end
        if #slots > 0 then
          redis.call('ZREM', HELD, unpack(slots))
        end
        if #rids > 0 then
          local found = redis.call('HMGET', LATEST, unpack(rids))
          local stale = {}
          for i = 1, #rids do -- bounded by 512
            if found[i] == owners[i] then
              stale[#stale + 1] = rids[i]
              latest[rids[i]] = false
            end
          end
          if #stale > 0 then
            redis.call('HDEL', LATEST, unpack(stale))
          end
        end
        redis.call('HDEL', GRANTS, unpack(numbers))
        for i = 1, #numbers do -- bounded by 512
          known[numbers[i]] = false
        end
      end
      if save_pending then
        save_pending = false
        local fields = {
          'tokens', fmt(TOTALS.tokens), 'adjusted', fmt(TOTALS.adjusted), 'accuracy', exact(TOTALS.accuracy),
          'live', fmt(TOTALS.live),
        }
        if penalty > NOW then
          fields[#fields + 1] = 'penalty'
          fields[#fields + 1] = fmt(penalty)
          stored_penalty = true
        elseif stored_penalty then
          redis.call('HDEL', STATE, 'penalty')
          stored_penalty = false
        end
        fields[#fields + 1] = 'ra'
        fields[#fields + 1] = exact(R.avail)
        fields[#fields + 1] = 'rl'
        fields[#fields + 1] = fmt(R.last)
        fields[#fields + 1] = 'ta'
        fields[#fields + 1] = exact(T.avail)
        fields[#fields + 1] = 'tl'
        fields[#fields + 1] = fmt(T.last)
        fields[#fields + 1] = 'debt'
        fields[#fields + 1] = exact(T.debt)
        if granted then
          fields[#fields + 1] = 'grants'
          fields[#fields + 1] = fmt(counter)
        end
        redis.call('HSET', STATE, unpack(fields))
      end
    end

    return nil, LEAN
  end
end


-- The buckets, in the order a tie between equal waits is reported (rpm, tpm, itpm, otpm, rpd,
-- tpd; then concurrency): each refills `per` every `period` us up to `cap`, and counts one per
-- request ('request'), the request's whole tokens ('total'), or its input or output part. Its
-- state lives in the fields <key>a (level), <key>l (instant of the level) and, for a token bucket,
-- its debt (`debt_field`). (<key>c and <key>cu, a provider's ceiling that earlier versions kept
-- until the reset, are read by nobody and deleted on the next save.)
local SPECS = {
  {name = 'rpm', key = 'r', per = tonumber(ARGV[2]), period = MINUTE_US, cap = tonumber(ARGV[4]), counts = 'request'},
  {
    name = 'tpm', key = 't', per = tonumber(ARGV[3]), period = MINUTE_US, cap = tonumber(ARGV[5]), counts = 'total',
    debt_field = 'debt',
  },
}
if ARGV[8] ~= '' then
  SPECS[#SPECS + 1] = {
    name = 'itpm', key = 'i', per = tonumber(ARGV[8]), period = MINUTE_US, cap = tonumber(ARGV[9]), counts = 'input',
    debt_field = 'id',
  }
end
if ARGV[10] ~= '' then
  SPECS[#SPECS + 1] = {
    name = 'otpm', key = 'o', per = tonumber(ARGV[10]), period = MINUTE_US, cap = tonumber(ARGV[11]),
    counts = 'output', debt_field = 'od',
  }
end
if ARGV[12] ~= '' then
  SPECS[#SPECS + 1] = {name = 'rpd', key = 'd', per = tonumber(ARGV[12]), period = DAY_US, cap = tonumber(ARGV[12]), counts = 'request'}
end
if ARGV[13] ~= '' then
  SPECS[#SPECS + 1] = {
    name = 'tpd', key = 'e', per = tonumber(ARGV[13]), period = DAY_US, cap = tonumber(ARGV[13]), counts = 'total',
    debt_field = 'ed',
  }
end

local fields = {'penalty', 'tokens', 'adjusted', 'accuracy', 'live'}
for _, spec in ipairs(SPECS) do -- the buckets configured
  for _, suffix in ipairs({'a', 'l'}) do -- a bucket's two fields
    fields[#fields + 1] = spec.key .. suffix
  end
  fields[#fields + 1] = spec.debt_field or (spec.key .. 'a')
end
local LEGACY_AT = #fields -- then the ceilings of an earlier version, deleted where found
for _, spec in ipairs(SPECS) do -- the buckets configured
  fields[#fields + 1] = spec.key .. 'c'
  fields[#fields + 1] = spec.key .. 'cu'
end
local raw = redis.call('HMGET', STATE, unpack(fields))
-- What save() must delete: the penalty when one is stored, an earlier version's ceilings.
local STORED_PENALTY = raw[1] ~= false and raw[1] ~= nil
local LEGACY = {}
for i = LEGACY_AT + 1, #fields do -- the ceilings' fields
  if raw[i] then
    LEGACY[#LEGACY + 1] = fields[i]
  end
end

local PENALTY = tonumber(raw[1]) or 0
TOTALS = {
  tokens = tonumber(raw[2]) or 0, adjusted = tonumber(raw[3]) or 0, accuracy = tonumber(raw[4]) or 0,
  live = tonumber(raw[5]) or 0,
}

-- Every bucket configured (BUCKETS, in SPECS order), by name (BY_NAME); the token buckets, which
-- carry a debt, apart (METERS, tpm first).
local BUCKETS, BY_NAME, METERS = {}, {}, {}
for i, spec in ipairs(SPECS) do -- the buckets configured
  local at = 5 + (i - 1) * 3
  local b = {
    name = spec.name, key = spec.key, per = spec.per, period = spec.period, cap = spec.cap, counts = spec.counts,
    avail = tonumber(raw[at + 1]) or spec.cap, last = tonumber(raw[at + 2]) or NOW, debt_field = spec.debt_field,
  }
  if b.avail > b.cap then
    b.avail = b.cap -- another process configured a smaller burst
  end
  if spec.debt_field then
    b.debt = tonumber(raw[at + 3]) or 0
    METERS[#METERS + 1] = b
  end
  BUCKETS[i] = b
  BY_NAME[spec.name] = b
end
local REQUESTS, TOKENS = BY_NAME.rpm, BY_NAME.tpm

-- A penalty stored further ahead than MAX_DELAY_US (by a client that did not bound it) ends a day
-- from now, stored so at once: nothing holds the limiter shut for longer.
if PENALTY > NOW + MAX_DELAY_US then
  PENALTY = NOW + MAX_DELAY_US
  redis.call('HSET', STATE, 'penalty', fmt(PENALTY))
end

-- A provider's figure: at most `remaining` now (never raising the level); from there the bucket
-- refills at its own rate up to its own capacity, as LLMThrottle's TokenBucket::cap.
local function cap_at(b, remaining)
  b.avail = math.min(b.avail, math.max(remaining, 0))
end


-- What bucket b counts of a request of `total` tokens whose input and output parts are `input`
-- and `output` (nil when unknown: an input or output bucket then counts the whole total, any of
-- which may turn out to be input, or output).
local function share(b, total, input, output)
  if b.counts == 'input' and input ~= nil then
    return input
  elseif b.counts == 'output' and output ~= nil then
    return output
  end
  return total
end

-- An adjustment (limiter_adjust.lua): what token bucket b counts of `actual` tokens, given its
-- parts (`input`, `output`: nil when not given) and `record`, the grant adjusted. (Defined once per
-- run of the prelude, not once per adjustment: a global mark script adjusts many.)
local function adjust_target(b, record, actual, input, output)
  if input ~= nil then
    return share(b, actual, input, output)
  elseif b.counts == 'output' and record.output_cap >= 0 then
    return math.min(actual, record.output_cap)
  end
  return actual
end

-- The grants holding a slot that are not forgotten yet (those granted at or before NOW -
-- retention go at the next prune, as LLMThrottle's advance drops them before anything else).
local function slot_cutoff()
  return '(' .. fmt(NOW - RETENTION)
end

local function in_flight()
  return redis.call('ZCOUNT', HELD, slot_cutoff(), '+inf')
end

-- Microseconds until a slot is free if no grant is settled or released meanwhile: 0 when one is;
-- else when the oldest grant holding one is forgotten, `retention` after it was granted.
local function slot_wait()
  if in_flight() < MAX_CONCURRENT then
    return 0
  end
  local oldest = redis.call('ZRANGEBYSCORE', HELD, slot_cutoff(), '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
  return tonumber(oldest[2]) + RETENTION - NOW
end

-- {reason, wait in us} for a request of `estimated` tokens (split into `input` and `output` when
-- known): reason '' when it would be granted, else the binding limit, the one with the longest
-- wait (the first in BUCKETS order on a tie, then concurrency). A penalty (a provider's
-- Retry-After) refuses everything, reported as the request limit. `margin` (optional): tokens
-- the TPM bucket must also keep back (the dispatcher's reserves), the whole at most its
-- capacity, as LLMThrottle's check_parts: the other limits count the request alone, so a
-- reserve never makes a request that fits them look as if it never could.
local function check(estimated, input, output, margin)
  local best, reason = 0, ''
  for n_ = 1, #BUCKETS do -- the buckets configured
    local b = BUCKETS[n_]
    local wait
    if b.counts == 'request' then
      wait = wait_for(b, 1)
    else
      local need = needed(b, share(b, estimated, input, output))
      if b == TOKENS and margin ~= nil and margin > 0 then
        need = math.min(need + margin, math.max(b.cap, need))
      end
      wait = wait_for(b, need)
    end
    if b == REQUESTS then
      wait = math.max(wait, PENALTY - NOW)
    end
    if wait > best then
      best, reason = wait, b.name .. '_limit'
    end
  end
  if MAX_CONCURRENT ~= nil then
    local wait = slot_wait()
    if wait > best then
      best, reason = wait, 'concurrency_limit'
    end
  end
  return reason, best
end

-- What each limit beyond rpm and tpm holds, as the flat list {name, level, ...} that follows a
-- check's reply: the buckets' levels, and the slots free.
local function levels()
  local out = {}
  for i = 3, #BUCKETS do -- the buckets configured beyond rpm and tpm
    out[#out + 1] = BUCKETS[i].name
    out[#out + 1] = exact(available(BUCKETS[i]))
  end
  if MAX_CONCURRENT ~= nil then
    out[#out + 1] = 'concurrency'
    out[#out + 1] = fmt(math.max(0, MAX_CONCURRENT - in_flight()))
  end
  return out
end

-- The reply of a check: {reason, wait in us, requests available, tokens available, levels...}.
local function check_reply(reason, wait)
  local out = {reason, exact(wait), exact(available(REQUESTS)), exact(available(TOKENS))}
  for _, item in ipairs(levels()) do -- the limits beyond rpm and tpm
    out[#out + 1] = item
  end
  return out
end

-- The grant counter and the order's length, once read in this run of the prelude: kept here
-- (the script is atomic), so a run that grants many times reads and writes the counter once
-- (save() writes it) and never asks the order's length again (RPUSH and LPOP tell it).
local GRANT_COUNTER, ORDER_LEN = nil, nil

-- Whether save() waits for flush(): a global dispatch script, whose limiter operations all run
-- before its end with no pcall between them, saves the state once for all its grants.
local DEFER_SAVE = false

-- Whether the next consume's check is already made: the global scripts' 'reserve' checks the
-- request with the reserves it must leave, which holds whenever the request alone does.
local PRECHECKED = false

local function write_state()
  local fields = {
    'tokens', fmt(TOTALS.tokens), 'adjusted', fmt(TOTALS.adjusted), 'accuracy', exact(TOTALS.accuracy),
    'live', fmt(TOTALS.live),
  }
  if PENALTY > NOW then
    fields[#fields + 1] = 'penalty'
    fields[#fields + 1] = fmt(PENALTY)
    STORED_PENALTY = true
  elseif STORED_PENALTY then
    redis.call('HDEL', STATE, 'penalty')
    STORED_PENALTY = false
  end
  for n_ = 1, #BUCKETS do -- the buckets configured
    local b = BUCKETS[n_]
    fields[#fields + 1] = b.key .. 'a'
    fields[#fields + 1] = exact(b.avail)
    fields[#fields + 1] = b.key .. 'l'
    fields[#fields + 1] = fmt(b.last)
    if b.debt_field then
      fields[#fields + 1] = b.debt_field
      fields[#fields + 1] = exact(b.debt)
    end
  end
  if GRANT_COUNTER ~= nil then
    fields[#fields + 1] = 'grants'
    fields[#fields + 1] = fmt(GRANT_COUNTER)
  end
  if #LEGACY > 0 then
    redis.call('HDEL', STATE, unpack(LEGACY)) -- an earlier version's ceilings
    LEGACY = {}
  end
  redis.call('HSET', STATE, unpack(fields))
end

local save_pending = false

-- The records beyond MAX_RECORDS that a global dispatch's grants pushed out, dropped by flush()
-- in a few commands for all of them instead of five for each grant (drop_pending, below): set
-- by 'defer_drops' (redis/global_choice.py) when the limiter keeps no slots of max_concurrent
-- (dropping a record frees its slot, which a later check of the same call would count).
-- Nothing in such a call reads a record back (it grants, it never adjusts nor releases), and
-- the records it drops are the oldest, which it never wrote.
local DEFER_DROPS = false
local drops_pending = 0
local drop_pending -- defined with the history, below
-- In the same calls (DEFER_DROPS) the new records themselves, their place in the order and
-- their ids' latest are written by flush() too, one command each for all of them
-- (records_flush, below), before the drops (which may reach them).
local records_flush -- defined with the history, below
-- The records a session changed, written by flush() (records_write, below).
local records_write -- defined with the history, below

local checkpoint -- defined below

-- An operation's last step: its changes saved, or (DEFER_SAVE) left for flush() and kept as the
-- session's checkpoint (below): every operation that changes the state ends here, so a session's
-- caller needs no call of its own to take one after each operation.
local function save()
  if DEFER_SAVE then
    save_pending = true
    checkpoint()
  else
    write_state()
  end
end

-- Writes what save() deferred (DEFER_SAVE), after the records and drops deferred (DEFER_DROPS).
local function flush()
  records_flush()
  records_write()
  drop_pending()
  if save_pending then
    save_pending = false
    write_state()
  end
end

-- What write_state() writes, as it stood at checkpoint(): the global scripts take one when they
-- open the session, and save() one after each operation made, and when a mark fails midway (its
-- other marks are made) writes this back (rollback) instead of what the failed operation left
-- half changed in memory, as a limiter that saves after every operation would have it.
-- (Its tables are made once and written over: a dispatch takes one after each of its grants.)
local saved = nil

checkpoint = function()
  if saved == nil then
    saved = {levels = {}, totals = {}}
    for i = 1, #BUCKETS do -- the buckets configured
      saved.levels[i] = {}
    end
  end
  for i = 1, #BUCKETS do -- the buckets configured
    local b = BUCKETS[i]
    local kept = saved.levels[i]
    kept[1], kept[2], kept[3] = b.avail, b.last, b.debt
  end
  saved.penalty, saved.counter, saved.pending = PENALTY, GRANT_COUNTER, save_pending
  local totals = saved.totals
  totals[1], totals[2], totals[3], totals[4] = TOTALS.tokens, TOTALS.adjusted, TOTALS.accuracy, TOTALS.live
end

local function rollback()
  if saved == nil then
    return
  end
  for i = 1, #BUCKETS do -- the buckets configured
    local b = BUCKETS[i]
    b.avail, b.last, b.debt = saved.levels[i][1], saved.levels[i][2], saved.levels[i][3]
  end
  -- The grant numbers used since stay used (their records may be written: a script's writes
  -- before an error stay), so the counter is saved as it stands.
  PENALTY, save_pending = saved.penalty, saved.pending or GRANT_COUNTER ~= saved.counter
  TOTALS.tokens, TOTALS.adjusted, TOTALS.accuracy, TOTALS.live = unpack(saved.totals)
  flush()
end

-- The history: one record per grant, as LLMThrottle keeps it. A record holds: granted at, the
-- request id, tokens (estimate, then actual), estimate, actual (-1: none), debt paid on top of
-- the estimate, tokens this grant holds out of the token bucket now (what a release gives back),
-- debt its adjustments added (what a release takes back), the number of the grant of the same id
-- that was latest when it was made ('' for none), whether it was released (1) or still counts (0);
-- then the input and output tokens it counts for (-1: not given), the output it reserved (-1:
-- none given; an adjustment without parts counts no more output than that), whether it holds a
-- slot of max_concurrent (1) or not (0), and its charge on each other token bucket by name
-- ({tokens, debt paid, tokens held, debt added}, as the four fields above for the token bucket).
-- A record written before these fields existed reads them as absent.
-- A second grant under one request id is a record of its own: adjust_consumption and release act
-- on the latest, and once that one is released the one before it is the latest again. Released
-- records stay in the order, as LLMThrottle keeps them, until they age out.
-- In a global script's session (DEFER_SAVE) the records it reads are read once and those it
-- changes are written back by flush(), one HSET for all of them (a call of 16 marks wrote and
-- read each of its 16 records by itself): `record_known` holds each record read or written
-- (number -> packed, false: none), `records_dirty` the numbers flush() writes (`dirty` says
-- which are). The request ids' latest grants are written at once as ever (write-through) and
-- kept in `latest_known` (id -> number, false: none) so that no id is read twice. The global
-- mark script names the ids its marks adjust (ARGV.prefetch, below): both read in one HMGET
-- each.
local record_known, records_dirty, dirty, latest_known = {}, {}, {}, {}

local function latest_number(request_id)
  local number = latest_known[request_id]
  if number == nil then
    number = redis.call('HGET', LATEST, request_id)
    latest_known[request_id] = number
  end
  return number or nil
end

-- The latest grant of `request_id` is `number` from now on (nil: none).
local function set_latest(request_id, number)
  if number then
    redis.call('HSET', LATEST, request_id, number)
  else
    redis.call('HDEL', LATEST, request_id)
  end
  latest_known[request_id] = number or false
end

-- Writes the records changed in memory (records_dirty; bounded by the records this run changed).
records_write = function()
  if #records_dirty == 0 then
    return
  end
  local numbers = records_dirty
  records_dirty = {} -- taken first: never written twice
  local fields = {}
  for _, number in ipairs(numbers) do -- the records changed
    if dirty[number] then
      dirty[number] = nil
      fields[#fields + 1] = number
      fields[#fields + 1] = record_known[number]
    end
  end
  if #fields > 0 then
    redis.call('HSET', GRANTS, unpack(fields))
  end
end

-- A record deleted: neither known nor written any more.
local function record_deleted(number)
  record_known[number], dirty[number] = false, nil
end

if ARGV.prefetch ~= nil and #ARGV.prefetch > 0 then
  -- Bounded by the global mark script's marks (at most MARKS_MAX).
  local ids = ARGV.prefetch
  local numbers = redis.call('HMGET', LATEST, unpack(ids))
  local named = {}
  for i, request_id in ipairs(ids) do -- the ids just read
    latest_known[request_id] = numbers[i]
    if numbers[i] and record_known[numbers[i]] == nil then
      record_known[numbers[i]] = true -- (read below)
      named[#named + 1] = numbers[i]
    end
  end
  if #named > 0 then
    local packed = redis.call('HMGET', GRANTS, unpack(named))
    for i, number in ipairs(named) do -- the records just read
      record_known[number] = packed[i]
    end
  end
end

local function load_record(number)
  if not number then
    return nil
  end
  local packed = record_known[number]
  if packed == nil then
    packed = redis.call('HGET', GRANTS, number)
    if DEFER_SAVE then
      record_known[number] = packed
    end
  end
  if not packed then
    return nil
  end
  local at, rid, tokens, estimated, actual, debt, held, owed, previous, released, input, output, output_cap, slot,
    charges = cmsgpack.unpack(packed)
  return {
    number = number, at = at, rid = rid, tokens = tokens, estimated = estimated, actual = actual, debt = debt,
    held = held, owed = owed, previous = previous, released = released, input = input or -1, output = output or -1,
    output_cap = output_cap or -1, slot = slot or 0, charges = charges or {},
  }
end

-- The latest grant of a request id that still counts, or nil.
local function latest_record(request_id)
  return load_record(latest_number(request_id))
end

local function store_record(r)
  local packed = cmsgpack.pack(
    r.at, r.rid, r.tokens, r.estimated, r.actual, r.debt, r.held, r.owed, r.previous, r.released, r.input, r.output,
    r.output_cap, r.slot, r.charges)
  if DEFER_SAVE then
    record_known[r.number] = packed
    if not dirty[r.number] then
      dirty[r.number] = true
      records_dirty[#records_dirty + 1] = r.number
    end
  else
    redis.call('HSET', GRANTS, r.number, packed)
  end
end

-- The records written by records_flush() (DEFER_DROPS), in order: each packed there, once the
-- latest grants of their ids are read (one HMGET for all of them).
local new_records = {}

-- A new grant of `request_id`, latest of its id from now on (holding a slot when r.slot is 1).
local function add_record(request_id, r)
  if GRANT_COUNTER == nil then
    GRANT_COUNTER = tonumber(redis.call('HGET', STATE, 'grants')) or 0
  end
  GRANT_COUNTER = GRANT_COUNTER + 1
  r.number = fmt(GRANT_COUNTER)
  r.rid = request_id
  r.released = 0
  if DEFER_DROPS and MAX_CONCURRENT == nil then
    new_records[#new_records + 1] = r -- its `previous` set by records_flush()
    if ORDER_LEN == nil then
      ORDER_LEN = redis.call('LLEN', ORDER)
    end
    ORDER_LEN = ORDER_LEN + 1
    count_in(r, 1)
    return
  end
  r.previous = latest_number(request_id) or ''
  store_record(r)
  ORDER_LEN = redis.call('RPUSH', ORDER, r.number)
  set_latest(request_id, r.number)
  if r.slot == 1 then
    redis.call('ZADD', HELD, r.at, r.number)
  end
  count_in(r, 1)
end

-- Frees the slot record r holds, if any (it is settled, released or forgotten).
local function free_slot(r)
  if r.slot == 1 then
    redis.call('ZREM', HELD, r.number)
    r.slot = 0
  end
end

-- The charge of record r on token bucket b, in the record's own terms {c = tokens it counts for,
-- d = debt it paid, h = tokens it holds out of the bucket, w = debt its adjustments added}; nil
-- when r was granted before b was configured.
local function charge_of(r, b)
  if b == TOKENS then
    return {c = r.tokens, d = r.debt, h = r.held, w = r.owed}
  end
  return r.charges[b.name]
end

local function set_charge(r, b, ch)
  if b == TOKENS then
    r.tokens, r.debt, r.held, r.owed = ch.c, ch.d, ch.h, ch.w
  else
    r.charges[b.name] = ch
  end
end

-- Releases the latest grant of its id: it stops counting, and the grant of the same id before it
-- (if it still counts, that is, has not aged out) is the latest again.
local function release_record(r)
  r.released = 1
  store_record(r)
  count_in(r, -1)
  local previous = load_record(r.previous)
  if previous ~= nil and previous.released == 0 then
    set_latest(r.rid, previous.number)
  else
    set_latest(r.rid, nil)
  end
end

-- Gives a grant back whole, as if it had never been made: its request to each request bucket, to
-- each token bucket the tokens it holds, the debt it paid (owed again) and the debt its
-- adjustments added (cancelled, or given back where later grants paid it), and its slot of
-- max_concurrent. `latest`: it is the latest
-- grant of its id, and the one before it becomes the latest again; an earlier grant of an id
-- that has a later one only stops counting.
local function give_back(record, latest)
  for n_ = 1, #BUCKETS do -- the buckets configured
    local b = BUCKETS[n_]
    refill(b)
    if b.counts == 'request' then
      refund(b, 1)
    else
      local ch = charge_of(record, b)
      if ch ~= nil then
        refund(b, ch.h)
        give_back_owed(b, ch.w)
        b.debt = b.debt + ch.d
        if b.debt < DEBT_DUST then
          b.debt = 0
        end
      end
    end
  end
  free_slot(record)
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
  if number and ORDER_LEN ~= nil then
    ORDER_LEN = ORDER_LEN - 1
  end
  local r = load_record(number)
  if r == nil then
    return
  end
  if r.released == 0 then
    count_in(r, -1)
  end
  free_slot(r)
  if latest_number(r.rid) == number then
    set_latest(r.rid, nil)
  end
  redis.call('HDEL', GRANTS, number)
  record_deleted(number)
end

-- Drops the records granted at or before NOW - retention (oldest first, stopping at the first
-- younger one), then the oldest beyond the record limit: LLMThrottle's advance. Returns how many.
-- The records granted at or before NOW - retention are dropped once per run of this prelude: the
-- operations a global script runs on it (redis/global_choice.py) share its instant, and the
-- records they add are granted at NOW, after the cutoff.
local aged_out = false

local function prune()
  local dropped = 0
  local cutoff = NOW - RETENTION
  if not aged_out and ORDER_LEN == nil then
    ORDER_LEN = redis.call('LLEN', ORDER)
  end
  -- Bounded by the records kept (the list's length when the loop starts).
  for _ = 1, aged_out and 0 or ORDER_LEN do
    local oldest = load_record(redis.call('LINDEX', ORDER, ZERO))
    if oldest ~= nil and oldest.at > cutoff then
      break
    end
    pop_oldest()
    dropped = dropped + 1
  end
  aged_out = true
  if ORDER_LEN == nil then
    ORDER_LEN = redis.call('LLEN', ORDER)
  end
  if DEFER_DROPS and MAX_CONCURRENT == nil then
    -- Dropped by flush() (drop_pending): ORDER_LEN counts them until then.
    drops_pending = math.max(drops_pending, ORDER_LEN - MAX_RECORDS)
    return dropped
  end
  -- Bounded by the records beyond the limit.
  for _ = 1, ORDER_LEN - MAX_RECORDS do
    pop_oldest()
    dropped = dropped + 1
  end
  if MAX_CONCURRENT ~= nil then
    -- Slots of grants forgotten without this script's pop_oldest (a client of an earlier
    -- version dropped them): they count no more (in_flight), and are not kept either.
    redis.call('ZREMRANGEBYSCORE', HELD, '-inf', fmt(cutoff))
  end
  return dropped
end

-- Drops the oldest records prune() left to flush() (DEFER_DROPS), as pop_oldest() would one by
-- one: out of the order (LRANGE, LTRIM), out of the totals when still counting, their slots
-- freed, each one's id no longer latest when it still was (HMGET, HDEL), the records deleted.
local DROP_CHUNK = 512 -- records dropped per round of drop_pending (unpack's bound)

records_flush = function()
  if #new_records == 0 then
    return
  end
  local records = new_records
  new_records = {} -- taken first: never written twice
  local unknown, asked = {}, {}
  for n_ = 1, #records do -- the call's grants (at most WINNERS_MAX of a dispatch)
    local r = records[n_]
    if latest_known[r.rid] == nil and not asked[r.rid] then
      asked[r.rid] = true
      unknown[#unknown + 1] = r.rid
    end
  end
  if #unknown > 0 then
    local found = redis.call('HMGET', LATEST, unpack(unknown))
    for i = 1, #unknown do -- the ids just read
      local request_id = unknown[i]
      latest_known[request_id] = found[i]
    end
  end
  local packed, order, latest = {}, {}, {}
  for n_ = 1, #records do -- the call's grants
    local r = records[n_]
    -- The latest of its id before it: an earlier grant of this call's, or the one stored.
    r.previous = latest_known[r.rid] or ''
    latest_known[r.rid] = r.number
    packed[#packed + 1] = r.number
    packed[#packed + 1] = cmsgpack.pack(
      r.at, r.rid, r.tokens, r.estimated, r.actual, r.debt, r.held, r.owed, r.previous, r.released, r.input,
      r.output, r.output_cap, r.slot, r.charges)
    order[#order + 1] = r.number
    latest[#latest + 1] = r.rid
    latest[#latest + 1] = r.number
  end
  redis.call('HSET', GRANTS, unpack(packed))
  redis.call('RPUSH', ORDER, unpack(order))
  redis.call('HSET', LATEST, unpack(latest))
end

drop_pending = function()
  local n = drops_pending
  drops_pending = 0 -- taken first: never dropped twice
  if n > 0 then
    records_write() -- (the records read below as stored)
  end
  -- Bounded by the records beyond the limit, DROP_CHUNK per round.
  for _ = 1, math.ceil(n / DROP_CHUNK) do
    local numbers = redis.call('LRANGE', ORDER, 0, math.min(n, DROP_CHUNK) - 1)
    if #numbers == 0 then
      return
    end
    n = n - #numbers
    redis.call('LTRIM', ORDER, #numbers, -1)
    if ORDER_LEN ~= nil then
      ORDER_LEN = ORDER_LEN - #numbers
    end
    local packed = redis.call('HMGET', GRANTS, unpack(numbers))
    local rids, owners, slots = {}, {}, {}
    -- Bounded by DROP_CHUNK.
    for i, number in ipairs(numbers) do
      if packed[i] then
        local _, rid, tokens, estimated, actual, _, _, _, _, released, _, _, _, slot = cmsgpack.unpack(packed[i])
        if released == 0 then
          count_in({tokens = tokens, estimated = estimated, actual = actual}, -1)
        end
        if slot == 1 then
          slots[#slots + 1] = number
        end
        rids[#rids + 1] = rid
        owners[#owners + 1] = number
      end
    end
    if #slots > 0 then
      redis.call('ZREM', HELD, unpack(slots))
    end
    if #rids > 0 then
      local latest = redis.call('HMGET', LATEST, unpack(rids))
      local stale = {}
      -- Bounded by DROP_CHUNK.
      for i, rid in ipairs(rids) do
        if latest[i] == owners[i] then
          stale[#stale + 1] = rid
        end
      end
      if #stale > 0 then
        redis.call('HDEL', LATEST, unpack(stale))
        for _, rid in ipairs(stale) do -- bounded by DROP_CHUNK
          latest_known[rid] = false
        end
      end
    end
    redis.call('HDEL', GRANTS, unpack(numbers))
    for _, number in ipairs(numbers) do -- bounded by DROP_CHUNK
      record_deleted(number)
    end
  end
end
