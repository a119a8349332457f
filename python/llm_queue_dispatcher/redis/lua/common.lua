-- Helpers of every script: RedisStorage and RedisThrottle prepend this file to their prelude
-- (queue_common.lua, limiter_common.lua), and the prelude to each operation's file.
--
-- Loops. Every loop of every script has a bound written beside it: a constant (64 rounds, the 4
-- priorities), the arguments of the call, or what the call's keys hold. None runs until a
-- condition on a computed number comes true: a script that did not end would stop Redis for
-- every client (BUSY).

-- Every number handed to redis.call or stored as text goes through fmt() (whole numbers) or
-- exact() (any double, read back identical): Lua's own tostring keeps only 14 significant digits.
local function fmt(n)
  return string.format('%.0f', n)
end

local function exact(n)
  return string.format('%.17g', n)
end

-- Numbers a command takes, as text: a number handed to redis.call is printed ('%.17g') at every
-- call, a string is passed as it is (hot commands' constants are written so).
local ZERO, ONE = '0', '1'

-- The whole numbers 1 to 16 as text (n's is SMALL_TEXT[n]): a number joined to a string is
-- printed too, and a call meets these often (receive counts, a call's fresh identifiers).
local SMALL_TEXT = {'1', '2', '3', '4', '5', '6', '7', '8', '9', '10', '11', '12', '13', '14', '15', '16'}

-- The longest delay a provider can impose, in microseconds: one day (RedisThrottle's
-- MAX_PROVIDER_DELAY). A Retry-After, a reset or a penalty beyond it counts as one day, and
-- a duration that is no number (NaN) as none, whatever the client sent.
local MAX_DELAY_US = 86400000000

local function delay_us(text)
  local n = tonumber(text)
  if n == nil or n ~= n or n < 0 then
    return nil
  end
  return math.min(n, MAX_DELAY_US)
end

-- Replies kept for retries. A call that changes something is sent with a key of its own, named
-- after a random token the client draws once per call; a client that resends the call because
-- the connection broke before the reply came back (redis-py does so by itself) sends the same
-- token. The first run keeps its reply under that key for REPLY_MEMORY_MS; a resent call finds it
-- and answers the same, changing nothing again: a delete that landed is not reported stale, a
-- grant is not charged twice. Retries come within seconds (a reconnect and a resend).
local REPLY_MEMORY_MS = 60000

local function recalled(key)
  if key == nil then
    return nil
  end
  local kept = redis.call('GET', key)
  if not kept then
    return nil
  end
  return cmsgpack.unpack(kept)
end

local function remember(key, reply)
  if key ~= nil then
    redis.call('SET', key, cmsgpack.pack(reply), 'PX', REPLY_MEMORY_MS)
  end
  return reply
end
