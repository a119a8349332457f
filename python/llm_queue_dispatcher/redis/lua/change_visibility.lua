-- update_visibility_timeout: ARGV[5] member, ARGV[6] receipt token, ARGV[7] timeout in us,
-- counted from now. Returns 1, or 0 for a stale token. A timeout of 0 makes the message visible
-- at once (or dead-letters it, when its receives are used up) before the script returns. A resent
-- call (its reply lost) answers as the first run did.
local kept = recalled(REPLY)
if kept ~= nil then
  return kept
end
maintain()
local member = ARGV[5]
local s = holder(member, ARGV[6])
if s == nil then
  return 0
end
leave_current_set(member, s)
redis.call('ZADD', Q.inflight, fmt(NOW + tonumber(ARGV[7])), member)
touch(Q)
maintain()
return remember(REPLY, 1)
