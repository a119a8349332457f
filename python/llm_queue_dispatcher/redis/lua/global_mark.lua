-- global_mark: the mark of a message handed out by global_dispatch.lua, in one script: the
-- store's step, the limiter's correction of the delivery's reservation and the correction of
-- its tenant's charge. Same composition and KEYS as global_dispatch.lua.
--
-- ARGV[5] the store's step: 'delete', 'visibility', 'dead_letter' or 'release'
-- ARGV[6] member  ARGV[7] receipt token  ARGV[8] the visibility timeout in us ('visibility')
-- ARGV[9] the limiter's call: 'adjust', 'release', 'settle' or ''  ARGV[10] the delivery's key
-- ('': the current delivery's, when the token is current)
-- ARGV[11] tokens (the actual count for 'adjust')  ARGV[12] the limiter's adjustment strategy
-- ARGV[13..26] the limiter's own ARGV[1..14]
-- ARGV[27] ARGV[28] the actual input and output tokens for 'adjust' ('' each: not given)
--
-- Returns {store reply (1, or 0 when the token is stale), limiter reply, NOW}. The limiter's call and
-- the charge's correction are made even when the store's step finds the token stale: the
-- delivery ended either way, and its reservation and charge are its own (never a newer
-- delivery's). The charge becomes the actual count (processed with a count), stays the estimate
-- (processed without one), or 0 (failed, dead-lettered, released), if still in the window.

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

local op, member = ARGV[5], ARGV[6]
local stored = 0
local s = holder(member, ARGV[7])
local call, key, tokens = ARGV[9], ARGV[10], ARGV[11]
if key == '' and s ~= nil then
  key = s.rid .. '#' .. s.rc -- a message given back unread: the key of its delivery
end
if s ~= nil then
  stored = 1
  if op == 'delete' then
    leave_current_set(member, s)
    forget(Q, member, s)
  elseif op == 'visibility' then
    leave_current_set(member, s)
    redis.call('ZADD', Q.inflight, fmt(NOW + tonumber(ARGV[8])), member)
    maintain()
  elseif op == 'dead_letter' then
    leave_current_set(member, s)
    dead_letter(member, s)
  else
    give_back(member, s)
  end
  touch(Q)
end

local limited = ''
if call ~= '' then
  local argv = {}
  -- Bounded: the limiter's fourteen arguments.
  for i = 1, 14 do
    argv[i] = ARGV[12 + i]
  end
  argv[15] = key
  if call == 'adjust' then
    argv[16], argv[17], argv[18], argv[19] = tokens, ARGV[12], ARGV[27] or '', ARGV[28] or ''
  end
  limited = limiter_call(LIMITER_KEYS, argv, call)
end

local raw = redis.call('HGET', Q.charge, key)
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
    if redis.call('HINCRBY', Q.usage, tenant, fmt(corrected - charged)) <= 0 then
      redis.call('HDEL', Q.usage, tenant)
    end
    redis.call('HSET', Q.charge, key, cmsgpack.pack(tenant, corrected))
  end
end
return remember(GREPLY, {stored, limited, fmt(NOW)})
