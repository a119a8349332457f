-- can_process: ARGV[8] estimated tokens. Returns {reason ('' if allowed), wait in us, requests
-- available, tokens available}. Changes nothing.
local reason, wait = check(tonumber(ARGV[8]))
return {reason, exact(wait), exact(available(REQUESTS)), exact(available(TOKENS))}
