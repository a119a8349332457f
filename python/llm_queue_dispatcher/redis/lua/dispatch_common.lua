-- What the two global dispatch scripts share (global_dispatch.lua for fair_priority,
-- score_dispatch.lua for the score policy), placed after the limiter's prelude and before
-- either script by redis/global_choice.py: the most winners of a call, the limiter's keys, its
-- session for the call (lean or generic) and how an estimate's part is passed to it.
-- (The answer to a resent call is queue_common.lua's replayed(), as for dequeue.lua; a winner's
-- lease is lease() or, written with the call's other winners, lease_deferred() below.)

local WINNERS_MAX = 64 -- the most winners one call takes (the client asks for fewer)

local LIMITER_KEYS = {}
for i = 1, 5 do -- the limiter's five keys
  LIMITER_KEYS[i] = KEYS[QUEUE_KEYS + i]
end
local GREPLY = KEYS[QUEUE_KEYS + 6]

-- A part of the estimate for the limiter ('' when not given: its ITPM and OTPM count the whole).
local function part(n)
  if n == nil or n < 0 then
    return ''
  end
  return fmt(n)
end

-- The limiter's session for the call (redis/global_choice.py: the limiter's state read once),
-- opened by the call's first limiter operation: the lean one (limiter_common.lua, LEAN) when
-- the limiter is RPM and TPM alone, else the generic one, its state saved once after the rounds
-- (limiter_flush()) and a failed operation's half-made changes rolled back to the last
-- checkpoint. limiter_setup() names the limiter's arguments and whether the call may take
-- several winners (their history records then written together, and those they push out
-- dropped then; one grant alone writes its own, as a single call always did).
local limiter_session, limiter_lean, limiter_args, limiter_many = nil, nil, nil, false

local function limiter_setup(argv, many)
  limiter_args, limiter_many = argv, many
end

local function limiter_start()
  if limiter_session == nil and limiter_lean == nil then
    limiter_args.lean = limiter_many and 'many' or 'one'
    limiter_session, limiter_lean = limiter_open(LIMITER_KEYS, limiter_args)
    if limiter_lean == nil then
      limiter_session('defer') -- its state saved once, after the rounds (limiter_flush())
      if limiter_many then
        limiter_session('defer_drops')
      end
      limiter_session('checkpoint')
    end
  end
end

-- The generic session's operation `op` with `request`'s arguments after its own.
local function limiter(op, request)
  local ok, reply = pcall(limiter_session, op, request)
  if not ok then
    -- Its state in memory may be half changed: what the operations before it left is what the
    -- rounds' end saves (the grant numbers it used stay used: its records may be written).
    limiter_session('rollback')
    error(reply, 0)
  end
  -- (An operation that changed the state took its checkpoint: save() in limiter_common.lua.)
  return reply
end

-- A part of the estimate as the lean session takes it: the number part() passes as text.
local function lean_part(n)
  if n == nil or n < 0 then
    return nil
  end
  return tonumber(fmt(n))
end

-- The limiter's 'reserve' of winner `s` under its delivery's `key`: granted only if the buckets
-- hold its estimate (its parts for ITPM and OTPM) and the TPM bucket `need` (the estimate and
-- the reserves it must leave). {1, grant number}, else {0, reason, wait in us}.
local function limiter_reserve(key, s, need)
  limiter_start()
  if limiter_lean ~= nil then
    return limiter_lean.reserve(key, s.tok, lean_part(s.inp), lean_part(s.out), need)
  end
  return limiter('reserve', {key, s.tok, part(s.inp), part(s.out), need})
end

-- Whether the limiter would grant `tokens` now (changing nothing).
local function limiter_admits(tokens)
  limiter_start()
  if limiter_lean ~= nil then
    return limiter_lean.check(tokens) == ''
  end
  return limiter('check', {tokens, '', ''})[1] == ''
end

local function limiter_flush()
  if limiter_lean ~= nil then
    limiter_lean.flush()
  elseif limiter_session ~= nil then
    limiter_session('flush')
  end
end

-- Leases written together: lease_deferred() is queue_common.lua's lease() whose writes (the
-- state, the in-flight entry) and body read wait for leases_flush(), which makes them in one
-- command each for every winner of the call (HSET and ZADD with many, HMGET). Nothing a round
-- reads meets them before: a winner is out of the index and the visible sets (hide) when it is
-- leased, so no later round reads its state, its in-flight entry or its body.
local lease_states, lease_deadlines, lease_bodies = {}, {}, {}
-- The request ids of the winners lease_deferred() leased, in order (never reset: one per winner).
local lease_rids = {}

-- The deadline of the call's leases as text, formatted once (a call leases for one timeout).
local lease_timeout, lease_deadline = nil, nil

local function lease_deferred(out, taken, member, s, timeout)
  receive(s)
  lease_states[#lease_states + 1] = member
  lease_states[#lease_states + 1] = packed_state(s)
  if timeout ~= lease_timeout then
    lease_timeout, lease_deadline = timeout, fmt(NOW + timeout)
  end
  lease_deadlines[#lease_deadlines + 1] = lease_deadline
  lease_deadlines[#lease_deadlines + 1] = member
  received(out, member, s, true) -- the body filled in by leases_flush()
  lease_bodies[#lease_bodies + 1] = {member, #out}
  lease_rids[#lease_rids + 1] = s.rid
  taken[#taken + 1] = member
  taken[#taken + 1] = s.token
end

-- Writes the leases lease_deferred() made (bounded by the call's winners, WINNERS_MAX).
local function leases_flush(out)
  if #lease_bodies == 0 then
    return
  end
  local states, deadlines, bodies = lease_states, lease_deadlines, lease_bodies
  lease_states, lease_deadlines, lease_bodies = {}, {}, {} -- taken first: never written twice
  redis.call('HSET', Q.state, unpack(states))
  redis.call('ZADD', Q.inflight, unpack(deadlines))
  local members = {}
  for i = 1, #bodies do -- the winners (at most WINNERS_MAX)
    local body = bodies[i]
    members[i] = body[1]
  end
  local found = redis.call('HMGET', Q.body, unpack(members))
  for i = 1, #bodies do -- the winners (at most WINNERS_MAX)
    local body = bodies[i]
    out[body[2]] = found[i]
  end
end

-- The reply of a dispatch call: with winners, the queue touched and the reply kept for a resent
-- call (queue_common.lua's remember(), read back by replayed()).
local function answered(out, taken)
  if #taken == 0 then
    return out
  end
  touch(Q)
  remember(GREPLY, taken)
  return out
end
