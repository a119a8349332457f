-- What the two global dispatch scripts share (global_dispatch.lua for fair_priority,
-- score_dispatch.lua for the score policy), placed after the limiter's prelude and before
-- either script by redis/global_choice.py: the most winners of a call, the limiter's keys and
-- how an estimate's part is passed to it.
-- (A winner's lease, its reply fields and the answer to a resent call are queue_common.lua's
-- lease(), received() and replayed(), as for dequeue.lua.)

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
