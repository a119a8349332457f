-- What the two global dispatch scripts share (global_dispatch.lua for fair_priority,
-- score_dispatch.lua for the score policy), placed after the limiter's prelude and before
-- either script by redis/global_choice.py: a winner's reply fields, the limiter's keys, and the
-- answer to a resent call.

local WINNERS_MAX = 64 -- the most winners one call takes (the client asks for fewer)

-- Appends a received message's reply fields to `out`.
local function received(out, member, s)
  out[#out + 1] = member
  out[#out + 1] = s.mid
  out[#out + 1] = s.rc
  out[#out + 1] = s.at
  out[#out + 1] = s.first
  out[#out + 1] = s.token
  out[#out + 1] = redis.call('HGET', Q.body, member)
end

local LIMITER_KEYS = {}
for i = 1, 5 do -- the limiter's five keys
  LIMITER_KEYS[i] = KEYS[QUEUE_KEYS + i]
end
local GREPLY = KEYS[QUEUE_KEYS + 6]

-- A resent call (its reply lost) answers as its first run did: the winners that run received
-- and still holds, appended to `out`. Returns whether this call is such a resend.
local function replayed(out)
  local kept = recalled(GREPLY)
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
