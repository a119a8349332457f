-- release_message / batch_release: ARGV[5..] member, receipt token, repeated. Gives every current
-- one back as if its receive had not happened (queue_common.lua: give_back); returns the 0-based
-- positions of the stale ones. A resent call (its reply lost) answers as the first run did.
local kept = recalled(REPLY)
if kept ~= nil then
  return kept
end
maintain()
local stale = {}
local released = 0
-- Bounded by the call's arguments: one round per handle.
for i = 0, (#ARGV - 4) / 2 - 1 do
  local member = ARGV[5 + 2 * i]
  local s = holder(member, ARGV[6 + 2 * i])
  if s == nil then
    stale[#stale + 1] = i
  else
    give_back(member, s)
    released = released + 1
  end
end
if released == 0 then
  return stale
end
touch(Q)
return remember(REPLY, stale)
