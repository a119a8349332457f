-- can_process: ARGV[15] estimated tokens, ARGV[16] input tokens, ARGV[17] output tokens ('' when
-- not given). Returns {reason ('' if allowed), wait in us, requests available, tokens available,
-- then name, level of each other limit configured}. Changes nothing.
local reason, wait = check(tonumber(ARGV[15]), tonumber(ARGV[16]), tonumber(ARGV[17]))
return check_reply(reason, wait)
