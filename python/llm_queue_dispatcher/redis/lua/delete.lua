-- delete_message: ARGV[5] member, ARGV[6] receipt token. Returns 1, or 0 when the token is not
-- the message's latest (received again, deleted, dead-lettered, expired or purged).
maintain()
local member = ARGV[5]
local s = holder(member, ARGV[6])
if s == nil then
  return 0
end
leave_current_set(member, s)
forget(Q, member, s)
touch(Q)
return 1
