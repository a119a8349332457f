-- global_dispatch (fair_priority): selects the first message of the fair order over the whole
-- queue, reserves its budget at the co-located RedisThrottle and leases it, up to ARGV[5]
-- winners in rank order, in one script. The script is common.lua + queue_common.lua + the
-- limiter's prelude and operations wrapped as limiter_open() (redis/global_choice.py) +
-- dispatch_common.lua + this.
--
-- About 680 lines, one file: Redis runs each script as one source, and the call's rounds, its
-- reserves, its charges and the writes deferred to its end share the call's locals.
--
-- KEYS: the queue (and its dead-letter queue), then the limiter's five keys (state, grants,
-- grant order, latest, held), then this call's reply key (a resend answers as the first run).
-- ARGV[5] most winners  ARGV[6] visibility timeout in us  ARGV[7] the same in seconds
-- ARGV[8] fairness window in us  ARGV[9] urgent_first ('1' or '0')
-- ARGV[10] NORMAL's max_wait in us, ARGV[11] LOW's ('' each: never ages)
-- ARGV[12] the limiter's token capacity: a message above it never fits, is skipped, holds nothing
-- ARGV[13] the tenant reserve (reserve_tokens), ARGV[14] the URGENT reserve ('' each: automatic)
-- ARGV[15] k, then ARGV[16 .. 15 + 2k] tenant, weight pairs (tenants not named weigh 1)
-- ARGV[16 + 2k ..] the limiter's own ARGV[1..14] (its time source and settings)
--
-- Returns {NOW, '', 'unindexed'} for a queue not marked indexed (queue_common.lua, created());
-- else {NOW, wait in us ('' when nothing holds), then per winner: member, message id, receive
-- count, enqueued_at, first_received_at, receipt token, serialised request; then, with winners
-- of a call for more than one, one more element: a character per winner, '1' when its submitter had withdrawn it (the outcome
-- relay's `waiting` entry says 'withdrawn', redis/outcomes.py), else '0'}. The wait is set when
-- the first message of the order (that can ever fit) was refused by the limiter: nothing ranked
-- below it was taken (the budget is held for it). The withdrawals are only read (a Worker claims
-- a withdrawn one as before, which takes its entry): a Worker need not ask again for the others.
--
-- The order (API.md, "Scheduling under overload" and "Scheduling that holds on real traffic"):
-- URGENT first across tenants, oldest first (with urgent_first); then the tenant with the least
-- token use per weight over the window, ties to the tenant whose head is in the earlier lane,
-- then older; inside a tenant by lane (URGENT, HIGH, aged, NORMAL, LOW), earliest deadline,
-- oldest. Cost: O(log n) per tenant with visible messages, per winner (the winners of one call
-- are capped by HEADS_MAX), plus the charges and agings that came due (at most MAINTAIN_BATCH
-- each per call).
--
-- Tenant usage is one record per queue: `usage` (tenant -> tokens charged in the window),
-- `charges` (zset: delivery key -> when charged), `charge` (hash: delivery key -> msgpack of
-- tenant, tokens). A dispatch charges its estimate under the delivery's key ("request-id#n",
-- the limiter's key too); global_mark.lua corrects it; a charge leaves the window by itself, so
-- a process killed between dispatch and mark leaves nothing that outlives the window.

local SKIP_MAX = 16 -- messages above the capacity skipped per tenant, per lookup
-- The most tenant heads one call reads: each winner's lookup reads the head of every tenant with
-- visible messages, so a call takes at most HEADS_MAX / tenants winners (at least one). 64
-- winners over 6,000 tenants held Redis 8 s, past its busy-script limit (BUSY for every client).
local HEADS_MAX = 4096

-- Whether each winner in `out` (from its third element, seven each) was withdrawn by its
-- submitter: appended to `out` as one string (bounded by the winners, WINNERS_MAX).
local function withdrawals(out, rids)
  if #rids == 0 or tonumber(ARGV[5]) <= 1 then
    return out -- (a call for one winner is a dequeue's: nobody reads them)
  end
  local waiting = (string.gsub(Q.meta, ':meta$', ':waiting'))
  local entries = redis.call('HMGET', waiting, unpack(rids))
  local flags = {}
  for i = 1, #rids do -- the winners
    flags[i] = entries[i] == 'withdrawn' and '1' or '0'
  end
  out[#out + 1] = table.concat(flags)
  return out
end

maintain()
local now_text = NOW_TEXT -- (each winner's charge is stamped with it)
local out = {now_text, ''}
if replayed(out, GREPLY) then
  local rids = {}
  -- Bounded by the winners the first run took (seven fields each).
  for i = 3, #out, 7 do
    local s = load(Q, out[i])
    rids[#rids + 1] = s and s.rid or ''
  end
  return withdrawals(out, rids)
end

local meta = redis.call('HMGET', Q.meta, 'indexed', 'visibility_timeout', 'scored', 'scoring')
if meta[1] ~= '1' then
  -- Messages stored before the index existed may wait outside it: the client indexes the queue
  -- (index_scan.lua, index_fill.lua), then calls again.
  return {NOW_TEXT, '', 'unindexed'}
end

-- The tenants with visible messages (first() reads them), read here when a call for several
-- winners needs their number: nothing before the rounds changes them.
local tenant_list = nil
local limit = math.min(tonumber(ARGV[5]), WINNERS_MAX)
if limit > 1 then
  tenant_list = redis.call('HKEYS', Q.tenants)
  limit = math.max(1, math.min(limit, math.floor(HEADS_MAX / math.max(1, #tenant_list))))
end
limit = math.max(1, limit)
local timeout = tonumber(ARGV[6])
local window = tonumber(ARGV[8])
local urgent_first = ARGV[9] == '1'
local max_wait = {tonumber(ARGV[10]), tonumber(ARGV[11])}
local capacity = tonumber(ARGV[12])
local fixed_reserve, fixed_urgent = tonumber(ARGV[13]), tonumber(ARGV[14])
local weights = {}
local k = tonumber(ARGV[15])
-- Bounded by the call's arguments: one round per weighted tenant.
for i = 0, k - 1 do
  weights[ARGV[16 + 2 * i]] = tonumber(ARGV[17 + 2 * i])
end
local limiter_argv = {}
-- Bounded: the limiter's fourteen arguments.
for i = 1, 14 do
  limiter_argv[i] = ARGV[15 + 2 * k + i]
end
limiter_setup(limiter_argv, limit > 1)
local refill = tonumber(limiter_argv[3]) / 60 -- the token bucket's refill, tokens per second
if meta[3] == '1' and meta[4] ~= '1' then
  -- No process of the score policy dispatches from this queue: its index is dropped, and no
  -- script keeps it any more (queue_common.lua, score_kept) until one does.
  redis.call('UNLINK', Q.sc_members, Q.sc_ages, Q.sc_classes, Q.sc_cells, Q.sc_heads)
  redis.call('HDEL', Q.meta, 'scored')
  Q.score_kept = false
end
if meta[2] ~= ARGV[7] then
  redis.call('HSET', Q.meta, 'visibility_timeout', ARGV[7])
end

-- Charges that left the window: at most MAINTAIN_BATCH per call (the oldest first).
local horizon = NOW - window
local gone = redis.call('ZRANGEBYSCORE', Q.charges, '-inf', fmt(horizon), 'LIMIT', ZERO, MAINTAIN_BATCH_TEXT)
-- Bounded by MAINTAIN_BATCH (the LIMIT above).
for _, key in ipairs(gone) do
  local raw = redis.call('HGET', Q.charge, key)
  if raw then
    local tenant, tokens = cmsgpack.unpack(raw)
    -- (A charge corrected to 0 is skipped: Redis reads no '-0' as an integer.)
    if tokens ~= 0 and redis.call('HINCRBY', Q.usage, tenant, fmt(-tokens)) <= 0 then
      redis.call('HDEL', Q.usage, tenant)
    end
    redis.call('HDEL', Q.charge, key)
  end
  redis.call('ZREM', Q.charges, key)
end

-- Aging: NORMAL and LOW messages that have waited longer than their max_wait move to the aged
-- lane, at most MAINTAIN_BATCH per call.
for i = 1, 2 do -- NORMAL, LOW
  if max_wait[i] ~= nil then
    local due = redis.call(
      'ZRANGEBYSCORE', Q.aging[i], '-inf', '(' .. fmt(NOW - max_wait[i]), 'LIMIT', ZERO, MAINTAIN_BATCH_TEXT
    )
    -- Bounded by MAINTAIN_BATCH (the LIMIT above).
    for _, member in ipairs(due) do
      local s = load(Q, member)
      redis.call('ZREM', Q.aging[i], member)
      redis.call('ZREM', Q.lanes, lane_key(member, s, NATIVE_LANE[s.p + 1]))
      redis.call('ZADD', Q.lanes, ZERO, lane_key(member, s, '2'))
    end
  end
end

-- The first message of `tenant` (lane, deadline, oldest) that can ever fit: member, lane, its
-- entry in the lanes, or nil.
-- An entry is <prefix><lane><deadline: 16><member: 15><tokens>.
-- Messages found this call to never fit one of the limiter's limits (its ITPM, OTPM, TPD...):
-- skipped like those above the capacity (at most SKIP_MAX per call).
local excluded = {}

-- A message above the capacity, passed over: its submitter, if one waits, hears that it never
-- fits (it stays queued, as the per-process path leaves it). Told once: the entry goes.
local function never_fits(member)
  local s = load(Q, member)
  if s ~= nil then
    report_ended(Q, s.rid, 'RateLimitError', 'request ' .. s.rid .. ' needs more tokens than the limiter can ever '
      .. 'grant (capacity ' .. fmt(capacity) .. '); it stays queued', {reason = 'tpm_limit', available_in = 'inf'})
  end
end

-- Each tenant's range in the lanes ({low, high}), made once per call.
local ranges = {}

local function head_of(tenant)
  local prefix = tenant_prefix(tenant)
  local base = #prefix
  local range = ranges[tenant]
  if range == nil then
    range = {'[' .. prefix, '[' .. prefix .. '\255'}
    ranges[tenant] = range
  end
  local keys = redis.call('ZRANGEBYLEX', Q.lanes, range[1], range[2], 'LIMIT', ZERO, ONE)
  local first_key = keys[1]
  if first_key == nil then
    return nil
  end
  local member = string.sub(first_key, base + 18, base + 32)
  if tonumber(string.sub(first_key, base + 33)) <= capacity and not excluded[member] then
    -- The usual case, answered here: the first entry fits (its lane is one digit).
    return member, string.byte(first_key, base + 1) - 48, first_key
  end
  local function fits(key)
    return tonumber(string.sub(key, base + 33)) <= capacity and not excluded[string.sub(key, base + 18, base + 32)]
  end
  local low, high = range[1], range[2]
  if keys[1] ~= nil and not fits(keys[1]) then
    if tonumber(string.sub(keys[1], base + 33)) > capacity then
      never_fits(string.sub(keys[1], base + 18, base + 32))
    end
    keys = redis.call('ZRANGEBYLEX', Q.lanes, low, high, 'LIMIT', 1, 2 * SKIP_MAX - 1)
  end
  -- Bounded by 2 * SKIP_MAX (the LIMITs above).
  for n_ = 1, #keys do
    local key = keys[n_]
    if fits(key) then
      return string.sub(key, base + 18, base + 32), tonumber(string.sub(key, base + 1, base + 1)), key
    elseif tonumber(string.sub(key, base + 33)) > capacity then
      never_fits(string.sub(key, base + 18, base + 32))
    end
  end
  return nil
end

-- The winners' charges are written after the rounds (charges_flush), one command each for all of
-- them: `usage_stored` holds what the usage record held when this call read it (or after this
-- call changed it), `usage_added` what the winners charged since, not written yet. A tenant's use
-- is their sum, exact in doubles (whole numbers below 2^53), as the HINCRBY of each winner gave it.
local usage_stored, usage_added, added_order = {}, {}, {}
-- The winners' delivery keys and their charges (msgpack of tenant, tokens), in order.
local charge_keys, charge_values, charged = {}, {}, {}

local function usage_of(tenant)
  local stored = usage_stored[tenant]
  if stored == nil then
    stored = tonumber(redis.call('HGET', Q.usage, tenant)) or 0
    usage_stored[tenant] = stored
  end
  return (stored + (usage_added[tenant] or 0)) / (weights[tenant] or 1)
end

-- What the rounds of one call read of the tenants, kept until a round changes it: the tenants with
-- visible messages (`tenant_list`, read once: no round makes a tenant visible), each one's head
-- ({member, lane}, or false: none that fits) and use per weight (the winner's from its charge's
-- HINCRBY), and the states of heads read to compare their ages on a tie (the round that takes
-- one reads it no more: a visible message's state changes only when it is taken, and then it is
-- no head again). A round drops what it changes (forget_tenant): the winner's tenant (its head
-- left, its use grew), a tenant whose head expired or was found to never fit, a tenant whose
-- earlier charge went. So each winner after the first costs one head lookup, not one per tenant.
local heads, uses, states, usage_read = {}, {}, {}, false
-- The lanes' entry of each head read ({entry, lane}): the winner's is taken out by take_visible().
local entries = {}

local function forget_tenant(tenant)
  if tenant ~= nil then
    heads[tenant], uses[tenant] = nil, nil
  end
end

-- Reads into `states` those of the heads `members` not read yet, in one command for all of them
-- (not one each): their ages decide a tie.
local function read_states(members)
  local unknown = {}
  -- Bounded by the heads tied (at most one per tenant with visible messages).
  for n_ = 1, #members do
    local member = members[n_]
    if states[member] == nil then
      unknown[#unknown + 1] = member
    end
  end
  if #unknown == 0 then
    return
  end
  local found = redis.call('HMGET', Q.state, unpack(unknown))
  -- Bounded by the heads just read.
  for i = 1, #unknown do
    local member = unknown[i]
    states[member] = state_of(found[i])
  end
end

-- Whether the URGENT set was found empty this call: no round makes a message visible, so it
-- stays so (one ZRANGE per call, not per winner).
local no_urgent = false

-- The winner: member, state and (a tenant's head) its lanes' entry and lane, or nil.
local function first()
  if urgent_first and not no_urgent then
    local oldest = redis.call('ZRANGE', Q.urgent, ZERO, ZERO)
    no_urgent = oldest[1] == nil
    if oldest[1] ~= nil and (load(Q, oldest[1]).tok > capacity or excluded[oldest[1]]) then
      if load(Q, oldest[1]).tok > capacity then
        never_fits(oldest[1])
      end
      oldest = redis.call('ZRANGE', Q.urgent, 1, 2 * SKIP_MAX - 1)
    end
    -- Bounded by 2 * SKIP_MAX (the ZRANGEs above).
    for _, member in ipairs(oldest) do
      local s = load(Q, member)
      if s.tok <= capacity and not excluded[member] then
        return member, s
      elseif s.tok > capacity then
        never_fits(member)
      end
    end
  end
  -- The best tenant by (use per weight, its head's lane, its head's age, its head's member).
  if not usage_read then
    usage_read = true
    tenant_list = tenant_list or redis.call('HKEYS', Q.tenants)
    if #tenant_list > 0 then
      local used = redis.call('HMGET', Q.usage, unpack(tenant_list))
      -- Bounded by the tenants with visible messages (the hash just read).
      for i = 1, #tenant_list do
        local tenant = tenant_list[i]
        usage_stored[tenant] = tonumber(used[i]) or 0
        uses[tenant] = usage_of(tenant)
      end
    end
  end
  -- The heads tied with the best on use and lane (their ages decide, read together after).
  local best, best_use, best_lane, tied = nil, nil, nil, nil
  -- Bounded by the tenants with visible messages (read once per call).
  for n_ = 1, #tenant_list do
    local tenant = tenant_list[n_]
    local head = heads[tenant]
    if head == nil then
      local member, lane, entry = head_of(tenant)
      head = member ~= nil and {member, lane} or false
      heads[tenant] = head
      if member ~= nil then
        entries[member] = {entry, lane}
      end
    end
    if head then
      local member, lane = head[1], head[2]
      local use = uses[tenant]
      if use == nil then
        use = usage_of(tenant)
        uses[tenant] = use
      end
      if best == nil or use < best_use or (use == best_use and lane < best_lane) then
        best, best_use, best_lane, tied = member, use, lane, nil
      elseif use == best_use and lane == best_lane then
        tied = tied or {best}
        tied[#tied + 1] = member
      end
    end
  end
  if best == nil then
    return nil
  end
  if tied ~= nil then
    -- The oldest, then the lowest member, of the heads tied.
    read_states(tied)
    best = tied[1]
    -- Bounded by the heads tied.
    for i = 2, #tied do
      local member = tied[i]
      local at, best_at = states[member].at, states[best].at
      if at < best_at or (at == best_at and member < best) then
        best = member
      end
    end
  end
  local s = states[best] or load(Q, best)
  states[best] = nil
  return best, s, entries[best]
end

-- The reserves (API.md, "Scheduling that holds on real traffic"; tests/reference/fair.py): a
-- non-URGENT winner must leave the URGENT reserve in the bucket, and one of a backlogged tenant
-- the tenant reserve on top, its need at most the capacity; neither is kept while a backlog
-- clears (the limiter admits all the visible messages' estimates together, and nothing arrived
-- for as long as the bucket takes to refill both).
local function recent_max(key, count)
  local most = nil
  -- Bounded by `count` (the LRANGE).
  for _, value in ipairs(redis.call('LRANGE', key, 0, count - 1)) do
    local n = tonumber(value)
    if most == nil or n > most then
      most = n
    end
  end
  return most
end

local function urgent_reserve()
  if not urgent_first then
    return 0
  elseif fixed_urgent ~= nil then
    return fixed_urgent
  end
  local most = recent_max(Q.recent_urgent, 64)
  return most == nil and 0 or math.min(2 * most, 0.25 * capacity)
end

local recent_pending = {}

-- The estimates of this call's winners not pushed to `recent` yet: pushed in one LPUSH (in
-- their order, the latest at the head) before anything reads the list, and at the end.
local function push_recent()
  if #recent_pending > 0 then
    local pending = recent_pending
    recent_pending = {} -- taken first: a push that fails midway is never made twice
    redis.call('LPUSH', Q.recent, unpack(pending))
    redis.call('LTRIM', Q.recent, ZERO, '255')
  end
end

local function tenant_reserve()
  if fixed_reserve ~= nil then
    return fixed_reserve
  end
  push_recent()
  local most = recent_max(Q.recent, 256)
  return most == nil and 0.01 * capacity or math.min(1.5 * most, 0.1 * capacity)
end

-- A tenant is backlogged when another tenant is active (waiting, or with use in the window), it
-- has more than one visible message, and its use per weight is at least its fair share of what
-- the bucket refills over the window.
local function backlogged(tenant)
  if (tonumber(redis.call('HGET', Q.tenants, tenant)) or 0) <= 1 then
    return false
  end
  local active, count, total = {}, 0, 0
  local function add(name)
    if not active[name] then
      active[name], count, total = true, count + 1, total + (weights[name] or 1)
    end
  end
  -- Bounded by the tenants with visible messages.
  for _, name in ipairs(redis.call('HKEYS', Q.tenants)) do
    add(name)
  end
  local used = redis.call('HGETALL', Q.usage)
  -- Bounded by the tenants with use in the window.
  for i = 1, #used, 2 do
    if tonumber(used[i + 1]) + (usage_added[used[i]] or 0) > 0 then
      add(used[i])
    end
  end
  -- Bounded by the tenants this call charged (those not in the record yet).
  for _, name in ipairs(added_order) do
    if usage_added[name] > 0 then
      add(name)
    end
  end
  if count <= 1 then
    return false
  end
  return usage_of(tenant) >= refill * (window / 1000000) / total
end

-- Tokens the winner must find in the bucket on top of its own estimate.
local function margin(s)
  if s.p == 0 then
    return 0
  end
  index_flush() -- backlogged() and the backlog's check read the tenants' counts and 'waiting'
  local urgent, reserve = urgent_reserve(), tenant_reserve()
  local both = urgent + reserve
  if both <= 0 then
    return 0
  end
  local arrival = tonumber(redis.call('HGET', Q.meta, 'arrival'))
  local quiet = arrival == nil or (NOW - arrival) / 1000000 >= both / refill
  if quiet and limiter_admits(tonumber(redis.call('HGET', Q.meta, 'waiting')) or 0) then
    return 0 -- a backlog clears: no reserve is kept
  end
  if backlogged(s.ten) then
    urgent = urgent + reserve
  end
  return math.min(s.tok + urgent, capacity) - s.tok
end

-- The most margin(s) can be, read from the call's arguments alone: the reserves at their largest
-- (each automatic one at its cap: URGENT 0.25, tenant 0.1 of the capacity), both kept. A bucket
-- that holds the estimate and this much holds it with the exact margin too (a check only gets
-- harder as the tokens asked grow), and the grant is the same (the margin is only checked, never
-- taken): so the exact margin, which reads the recent estimates, the limiter's check of the
-- visible messages and every tenant's use, is worked out only when this bound is refused.
local function margin_bound(s)
  if s.p == 0 then
    return 0
  end
  local urgent = 0
  if urgent_first then
    urgent = math.max(0, fixed_urgent or 0.25 * capacity)
  end
  local reserve = math.max(0, fixed_reserve or 0.1 * capacity)
  return math.max(0, math.min(s.tok + urgent + reserve, capacity) - s.tok)
end

-- Charges winner `s` under its delivery's `key` (written by charges_flush()).
local function charge(key, s)
  local earlier = charged[key]
  if earlier ~= nil then
    -- Charged by this very call (not expected: one delivery key per winner): this charge replaces
    -- that one, whose tokens were not written yet.
    usage_added[earlier[1]] = usage_added[earlier[1]] - earlier[2]
    forget_tenant(earlier[1])
  elseif redis.call('ZADD', Q.charges, now_text, key) == 0 then
    -- `charges` and `charge` hold the same keys: a key already in `charges` has a charge.
    local raw = redis.call('HGET', Q.charge, key)
    if raw then
      -- The same key charged within the window: a request id deleted and enqueued again. The
      -- earlier charge leaves the record now (it would otherwise never be taken off).
      local tenant, tokens = cmsgpack.unpack(raw)
      if tokens ~= 0 then
        local left = redis.call('HINCRBY', Q.usage, tenant, fmt(-tokens))
        if left <= 0 then
          redis.call('HDEL', Q.usage, tenant)
          left = 0
        end
        usage_stored[tenant] = left
      end
      forget_tenant(tenant)
    end
  end
  charged[key] = {s.ten, s.tok}
  charge_keys[#charge_keys + 1] = key
  charge_values[#charge_values + 1] = cmsgpack.pack(s.ten, s.tok)
  if usage_added[s.ten] == nil then
    usage_added[s.ten] = 0
    added_order[#added_order + 1] = s.ten
  end
  usage_added[s.ten] = usage_added[s.ten] + s.tok
  forget_tenant(s.ten)
  uses[s.ten] = usage_of(s.ten)
end

-- Writes the charges of the call's winners (each already in `charges`, whose ZADD told whether
-- the key had an earlier charge): one HSET to `charge`, one HINCRBY per tenant charged (bounded
-- by the winners, WINNERS_MAX).
local function charges_flush()
  if #charge_keys == 0 then
    return
  end
  local keys, values, order, added = charge_keys, charge_values, added_order, usage_added
  charge_keys, charge_values, added_order, usage_added, charged = {}, {}, {}, {}, {} -- never twice
  local fields = {}
  for i = 1, #keys do -- the winners
    local key = keys[i]
    fields[#fields + 1] = key
    fields[#fields + 1] = values[i]
  end
  redis.call('HSET', Q.charge, unpack(fields))
  -- The tenants' use: what HINCRBY of each would leave, written in one HSET (and one HDEL) from
  -- what this call read (usage_stored: every tenant charged was read, the script is atomic).
  local kept, dropped = {}, {}
  for n_ = 1, #order do -- the tenants charged
    local tenant = order[n_]
    if added[tenant] ~= 0 then
      local now = usage_stored[tenant] + tonumber(fmt(added[tenant])) -- (HINCRBY's whole tokens)
      if now <= 0 then
        dropped[#dropped + 1] = tenant
        now = 0
      else
        kept[#kept + 1] = tenant
        kept[#kept + 1] = fmt(now)
      end
      usage_stored[tenant] = now
    end
  end
  if #kept > 0 then
    redis.call('HSET', Q.usage, unpack(kept))
  end
  if #dropped > 0 then
    redis.call('HDEL', Q.usage, unpack(dropped))
  end
end

-- The winners' removals from the visible sets and the aging sets, made after the rounds in one
-- ZREM per set (removals_flush): the rounds read neither (they read the lanes, which a winner
-- leaves at once, and URGENT's set, which take_visible() leaves to hide()).
local vis_leaving, aging_leaving = {{}, {}, {}, {}}, {{}, {}}

-- hide() for a tenant's head taken (`head`: its lanes' entry and lane, from head_of()): the entry
-- read is the one removed, and whether it had aged is its lane, not one more ZREM.
local function take_visible(member, s, head)
  if head == nil or s.p == 0 or s.ten == nil or score_kept(Q) then
    hide(Q, member, s)
    return
  end
  local leaving = vis_leaving[s.p + 1]
  leaving[#leaving + 1] = member
  if redis.call('ZREM', Q.lanes, head[1]) == 1 then
    if s.p >= 2 and head[2] ~= 2 then
      leaving = aging_leaving[s.p - 1]
      leaving[#leaving + 1] = member
    end
    index_uncount(Q, s)
  end
end

local function removals_flush()
  for p = 1, 4 do -- the four priorities
    if #vis_leaving[p] > 0 then
      redis.call('ZREM', Q.vis[p], unpack(vis_leaving[p]))
      vis_leaving[p] = {}
    end
  end
  for i = 1, 2 do -- NORMAL, LOW
    if #aging_leaving[i] > 0 then
      redis.call('ZREM', Q.aging[i], unpack(aging_leaving[i]))
      aging_leaving[i] = {}
    end
  end
end

local taken = {}
local skipped, expired = 0, 0
index_defer() -- the rounds' removals from the index counted once (index_flush() below)
-- Each round takes a winner, skips a message that never fits or expires one past retention.
local function rounds()
  -- Bounded by `limit` winners (at most WINNERS_MAX), SKIP_MAX skipped and SKIP_MAX expired.
  for _ = 1, limit + 2 * SKIP_MAX do
    local member, s, head = nil, nil, nil
    if #taken < 2 * limit then
      member, s, head = first()
    end
    if member == nil then
      break
    end
    if RETENTION > 0 and NOW - s.at > RETENTION then
      -- Past the retention period, left in the index by maintain()'s bound: it expires now (as
      -- every reader of the queue expires it); never handed out.
      catch_up(member, s)
      forget_tenant(s.ten)
      expired = expired + 1
      if expired >= SKIP_MAX then
        break -- the next calls drop the rest, MAINTAIN_BATCH each
      end
    else
      local key = s.rid .. '#' .. (SMALL_TEXT[s.rc + 1] or (s.rc + 1))
      -- Reserved only if the buckets hold the estimate (its parts for ITPM and OTPM) and the
      -- reserves it must leave.
      local bound = margin_bound(s)
      local granted = limiter_reserve(key, s, s.tok + bound)
      if granted[1] ~= 1 and bound > 0 then
        -- Refused with the bound: the exact margin decides (a grant with it is the same grant).
        local exact_margin = margin(s)
        if exact_margin < bound then
          granted = limiter_reserve(key, s, s.tok + exact_margin)
        end
      end
      if granted[1] ~= 1 and granted[3] == 'inf' and skipped < SKIP_MAX then
        -- It can never fit one of the limits: skipped, it holds nothing. Its submitter, if it
        -- has one waiting, hears so (it stays queued, as the per-process path leaves it).
        excluded[member] = true
        forget_tenant(s.ten)
        skipped = skipped + 1
        report_ended(Q, s.rid, 'RateLimitError', 'request ' .. s.rid .. ' needs more than the limiter can ever grant ('
          .. granted[2] .. '); it stays queued', {reason = granted[2], available_in = 'inf'})
      elseif granted[1] ~= 1 then
        out[2] = granted[3] -- the wait in us: the budget is held for this winner
        break
      else
        take_visible(member, s, head)
        lease_deferred(out, taken, member, s, timeout)
        charge(key, s)
        recent_pending[#recent_pending + 1] = tokens_text(s.tok)
      end
    end
  end
end
-- Redis keeps what a script wrote before an error: a round that fails (a message's state
-- unreadable, say) leaves the winners before it leased and their grants recorded, so what
-- counts them is written before the error goes on (else the tenants' counts and 'waiting'
-- would count them visible for good, and the limiter would hand their grant numbers out again).
local done, failure = pcall(rounds)
removals_flush()
leases_flush(out)
charges_flush()
push_recent()
index_flush()
limiter_flush()
if not done then
  error(failure, 0)
end
return withdrawals(answered(out, taken), lease_rids)
