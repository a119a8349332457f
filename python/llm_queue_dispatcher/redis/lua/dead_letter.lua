-- dead_letter_message: ARGV[5] member, ARGV[6] receipt token. Moves the message to the dead-letter
-- queue now (or drops it without one), counted as dead-lettered. Returns 1, or 0 for a stale token.
-- A resent call (its reply lost) answers as the first run did.
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
dead_letter(member, s)
touch(Q)
return remember(REPLY, 1)
