-- batch_delete: ARGV[5..] member, receipt token, repeated. Deletes every current one; returns the
-- 0-based positions of the stale ones.
maintain()
local stale = {}
local deleted = 0
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
if deleted > 0 then
  touch(Q)
end
return stale
