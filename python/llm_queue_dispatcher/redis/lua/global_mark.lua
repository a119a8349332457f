-- global_mark: the marks of messages handed out by global_dispatch.lua, up to MARKS_MAX in one
-- script: for each, the store's step, the limiter's correction of the delivery's reservation and
-- the correction of its tenant's charge. Same composition and KEYS as global_dispatch.lua.
--
-- ARGV[5] n, the marks  ARGV[6 .. 19] the limiter's own ARGV[1..14]
-- then ten arguments per mark, the i-th from ARGV[20 + 10 * (i - 1)]:
--   the store's step: 'delete', 'visibility', 'dead_letter' or 'release'; member; receipt token;
--   the visibility timeout in us ('visibility'); the limiter's call: 'adjust', 'release',
--   'settle' or ''; the delivery's key ('': the current delivery's, when the token is current);
--   tokens (the actual count for 'adjust'); the limiter's adjustment strategy; the actual input
--   and output tokens for 'adjust' ('' each: not given)
--
-- Returns {NOW, then per mark: store reply (1; 0 when the token is stale; -1 when the mark
-- failed), limiter reply (the error's text when it failed)}. The marks run in their order, each
-- on its own: one that raises an error fails alone (what it wrote before the error stays, as a
-- script's writes do), the others are made. The limiter's call and the charge's correction are
-- made even when the store's step finds the token stale: the delivery ended either way, and its
-- reservation and charge are its own (never a newer delivery's). The charge becomes the actual
-- count (processed with a count), stays the estimate (processed without one), or 0 (failed,
-- dead-lettered, released), if still in the window.

local MARKS_MAX = 64 -- redis/global_choice.py _MOST_MARKS

local LIMITER_KEYS = {}
for i = 1, 5 do -- the limiter's five keys
  LIMITER_KEYS[i] = KEYS[QUEUE_KEYS + i]
end
local GREPLY = KEYS[QUEUE_KEYS + 6]
local kept = recalled(GREPLY)
if kept ~= nil then
  return kept
end
maintain()

local limiter_argv = {}
-- Bounded: the limiter's fourteen arguments.
for i = 1, 14 do
  limiter_argv[i] = ARGV[5 + i]
end

-- The limiter's session (redis/global_choice.py), opened by the first mark that calls it: its
-- state read once for the marks of this call and saved once after them. The lean one
-- (limiter_common.lua, LEAN) when the limiter is RPM and TPM alone: an operation of it that
-- fails changes nothing. Else the generic one: a mark that fails midway has it saved as the
-- marks before it left it, then dropped.
local session, lean = nil, nil

-- Whether a mark changed the queue: its meta is touched once, after the marks.
local touched = false

-- Writes made once for all the marks, after them (flush_marks): the deleted messages' entries
-- (ids, body, state: HDEL with many fields each) and the charges' corrections (one HSET, one
-- HINCRBY per tenant). A mark's own reads never meet them: a message deleted by an earlier mark
-- of this call is `gone` (no holder any more), and a charge corrected by one is read from
-- `charges_now`.
local gone, gone_ids, gone_members = {}, {}, {}
local charges_now, corrected_keys, corrected_values = {}, {}, {}
local usage_delta, delta_order = {}, {}

local function forget_later(member, s)
  if Q.copies_none == nil then
    -- Read once per script (as forget() does): only dead_letter() adds copies.
    Q.copies_none = redis.call('EXISTS', Q.copies) == 0
  end
  if Q.copies_none then
    gone_ids[#gone_ids + 1] = s.rid
    gone_members[#gone_members + 1] = member
  else
    forget(Q, member, s)
  end
  gone[member] = true
end

-- The charges of the call's marks that name their delivery key, read in one HMGET when there are
-- several (bounded by MARKS_MAX marks).
-- The limiter's session reads the latest grants of the keys its calls name, and their records,
-- in one HMGET each too (limiter_common.lua, ARGV.prefetch).
local prefetched = {}
do
  local keys, limited = {}, {}
  for i = 1, math.min(tonumber(ARGV[5]), MARKS_MAX) do -- the marks
    local key = ARGV[20 + 10 * (i - 1) + 5]
    if key ~= nil and key ~= '' then
      keys[#keys + 1] = key
      if ARGV[20 + 10 * (i - 1) + 4] ~= '' then
        limited[#limited + 1] = key
      end
    end
  end
  if #limited > 1 then -- (one alone is read when its call needs it)
    limiter_argv.prefetch = limited
  end
  if #keys > 1 then -- (one alone is read when its mark needs it)
    local found = redis.call('HMGET', Q.charge, unpack(keys))
    for i = 1, #keys do -- the keys just read
      local key = keys[i]
      prefetched[key] = found[i]
    end
  end
end

-- The states and in-flight deadlines of the call's marked messages, read in one HMGET and one
-- ZMSCORE when there are several (bounded by MARKS_MAX marks). A mark takes its message's (an
-- earlier mark of the same message may have changed them: it reads its own), and a 'visibility'
-- mark drops them all (its maintain() may move any message).
local prefetched_states, prefetched_deadlines = {}, {}
do
  local members, seen = {}, {}
  for i = 1, math.min(tonumber(ARGV[5]), MARKS_MAX) do -- the marks
    local member = ARGV[20 + 10 * (i - 1) + 1]
    if member ~= nil and not seen[member] then
      seen[member] = true
      members[#members + 1] = member
    end
  end
  if #members > 1 then -- (one alone is read when its mark needs it)
    local states = redis.call('HMGET', Q.state, unpack(members))
    local deadlines = redis.call('ZMSCORE', Q.inflight, unpack(members))
    for i = 1, #members do -- the members just read
      local member = members[i]
      prefetched_states[member], prefetched_deadlines[member] = states[i], deadlines[i]
    end
  end
end

-- Messages deleted while in flight, taken out of `inflight` after the marks (flush_inflight: one
-- ZREM for all of them): their in-flight deadline was read (prefetched) and nothing before that
-- ZREM reads the set but a mark other than 'delete' (its maintain(), its step), which flushes
-- them first. A message deleted is `gone`: no later mark of the call reads its deadline.
local leaving = {}

local function flush_inflight()
  if #leaving > 0 then
    local members = leaving
    leaving = {} -- taken first: never removed twice
    redis.call('ZREM', Q.inflight, unpack(members))
  end
end

local function charge_of(key)
  local raw = charges_now[key]
  if raw == nil then
    raw = prefetched[key]
    if raw == nil then
      raw = redis.call('HGET', Q.charge, key)
    end
  end
  return raw
end

local function flush_marks()
  if #gone_members > 0 then
    redis.call('HDEL', Q.ids, unpack(gone_ids))
    redis.call('HDEL', Q.body, unpack(gone_members))
    redis.call('HDEL', Q.state, unpack(gone_members))
    gone_ids, gone_members = {}, {}
  end
  if #corrected_keys > 0 then
    local fields = {}
    for i, key in ipairs(corrected_keys) do -- the charges corrected (at most MARKS_MAX)
      fields[#fields + 1] = key
      fields[#fields + 1] = corrected_values[i]
    end
    redis.call('HSET', Q.charge, unpack(fields))
    corrected_keys, corrected_values = {}, {}
  end
  for _, tenant in ipairs(delta_order) do -- the tenants whose charges were corrected
    if usage_delta[tenant] ~= 0 and redis.call('HINCRBY', Q.usage, tenant, fmt(usage_delta[tenant])) <= 0 then
      redis.call('HDEL', Q.usage, tenant)
    end
  end
  usage_delta, delta_order = {}, {}
end

local function mark(op, member, token, visibility, call, key, tokens, strategy, input, output)
  local stored = 0
  local s = nil
  local raw, deadline = prefetched_states[member], prefetched_deadlines[member]
  prefetched_states[member], prefetched_deadlines[member] = nil, nil
  if op == 'visibility' then
    prefetched_states, prefetched_deadlines = {}, {}
  end
  if op ~= 'delete' then
    flush_inflight()
  end
  if not gone[member] then
    s = holder(member, token, raw, deadline)
  end
  if key == '' and s ~= nil then
    key = s.rid .. '#' .. (SMALL_TEXT[s.rc] or s.rc) -- a message given back unread: its delivery's key
  end
  if s ~= nil then
    stored = 1
    if op == 'delete' then
      if deadline and tonumber(deadline) > NOW then
        -- Still in flight (holder() left it so): out of `inflight` by flush_inflight().
        leaving[#leaving + 1] = member
      else
        leave_current_set(member, s)
      end
      forget_later(member, s)
    elseif op == 'visibility' then
      leave_current_set(member, s)
      redis.call('ZADD', Q.inflight, fmt(NOW + tonumber(visibility)), member)
      maintain()
    elseif op == 'dead_letter' then
      leave_current_set(member, s)
      dead_letter(member, s)
    else
      give_back(member, s)
    end
    touched = true
  end

  local limited = ''
  if call ~= '' then
    if session == nil and lean == nil then
      limiter_argv.lean = 'mark'
      session, lean = limiter_open(LIMITER_KEYS, limiter_argv)
      if lean == nil then
        session('defer')
        session('checkpoint')
      end
    end
    if lean ~= nil then
      if call == 'adjust' then
        limited = lean.adjust(key, tokens, strategy, input, output)
      elseif call == 'release' then
        limited = lean.release(key)
      elseif call == 'settle' then
        limited = lean.settle(key)
      end
    elseif call == 'adjust' then
      limited = session(call, {key, tokens, strategy, input, output})
    else
      limited = session(call, {key})
    end
    -- Made whole, it took its checkpoint (save() in limiter_common.lua): its records are
    -- written, so a failure later in this mark (the charge's correction) keeps what it changed,
    -- as a limiter that saves after every operation does.
  end

  local raw = charge_of(key)
  if raw then
    local tenant, charged = cmsgpack.unpack(raw)
    local corrected = 0
    if op == 'delete' then
      corrected = charged
      if call == 'adjust' then
        corrected = tonumber(tokens)
      end
    end
    if corrected ~= charged then
      -- Written by flush_marks(), with the other marks' corrections.
      local packed = cmsgpack.pack(tenant, corrected)
      charges_now[key] = packed
      corrected_keys[#corrected_keys + 1] = key
      corrected_values[#corrected_values + 1] = packed
      if usage_delta[tenant] == nil then
        usage_delta[tenant] = 0
        delta_order[#delta_order + 1] = tenant
      end
      usage_delta[tenant] = usage_delta[tenant] + corrected - charged
    end
  end
  return stored, limited
end

local out = {NOW_TEXT}
-- Bounded by MARKS_MAX marks.
for i = 1, math.min(tonumber(ARGV[5]), MARKS_MAX) do
  local base = 20 + 10 * (i - 1)
  local ok, stored, limited = pcall(
    mark, ARGV[base], ARGV[base + 1], ARGV[base + 2], ARGV[base + 3], ARGV[base + 4], ARGV[base + 5],
    ARGV[base + 6], ARGV[base + 7], ARGV[base + 8], ARGV[base + 9]
  )
  if ok then
    -- (What a later mark that fails leaves saved is the checkpoint its limiter call took: nothing
    -- after that call changes the limiter.)
    out[#out + 1] = stored
    out[#out + 1] = limited
  else
    if session ~= nil then
      -- What the marks before it changed is saved; what it changed in memory is not. The
      -- session is read again by the next mark.
      pcall(session, 'rollback')
    end
    session = nil
    -- An error raised by redis.call is a table with its text in `err`.
    if type(stored) == 'table' then
      stored = stored.err or stored.message
    end
    out[#out + 1] = -1
    out[#out + 1] = tostring(stored)
  end
end
flush_inflight()
flush_marks()
if lean ~= nil then
  lean.flush()
elseif session ~= nil then
  session('flush')
end
if touched then
  touch(Q)
end
return remember(GREPLY, out)
