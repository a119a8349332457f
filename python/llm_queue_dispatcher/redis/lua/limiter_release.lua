-- release: ARGV[8] request id. Gives the latest grant of that id back whole (give_back), as if it
-- had never been granted. The grant of that id before it, if any still counts, is the latest again.
-- Returns 1, or 0 when the id has no grant that counts. A resent call (its reply lost) releases
-- once.
local kept = recalled(REPLY)
if kept ~= nil then
  return kept
end
local request_id = ARGV[8]
prune()
local record = latest_record(request_id)
if record == nil then
  save()
  return 0
end
give_back(record, true)
save()
return remember(REPLY, 1)
