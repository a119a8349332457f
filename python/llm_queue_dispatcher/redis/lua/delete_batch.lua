-- batch_delete: ARGV[5..] member, receipt token, repeated. Deletes every current one; returns the
-- 0-based positions of the stale ones. A resent call (its reply lost) answers as the first run.
local kept = recalled(REPLY)
if kept ~= nil then
  return kept
end
maintain()
local stale = {}
local deleted = 0
-- Bounded by the call's arguments: one round per handle.
for i = 0, (#ARGV - 4) / 2 - 1 do
  local member = ARGV[5 + 2 * i]
  local s = holder(member, ARGV[6 + 2 * i])
  if s == nil then
    stale[#stale + 1] = i
  else
    leave_current_set(member, s)
    forget(Q, member, s)
    deleted = deleted + 1
  end
end
if deleted == 0 then
  return stale
end
touch(Q)
return remember(REPLY, stale)
