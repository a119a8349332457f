-- delete_message: ARGV[5] member, ARGV[6] receipt token. Returns 1, or 0 when the token is not
-- the message's latest (received again, deleted, released, dead-lettered, expired or purged). A
-- resent call (its reply lost) answers as the first run did: a delete that landed is not
-- reported stale.
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
forget(Q, member, s)
touch(Q)
return remember(REPLY, 1)
