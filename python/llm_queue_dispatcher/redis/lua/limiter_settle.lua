-- settle: ARGV[15] request id. Frees the slot of max_concurrent the latest grant of that id holds,
-- if it still holds one; its tokens stay as counted (a call that ended without a count to adjust
-- to). Returns 1, or 0 when the id has no grant that counts. A resent call (its reply lost)
-- answers as the first run: it never frees the slot of a grant made since.
local kept = recalled(REPLY)
if kept ~= nil then
  return kept
end
local request_id = ARGV[15]
prune()
local record = latest_record(request_id)
if record == nil then
  save()
  return 0
end
free_slot(record)
store_record(record)
save()
return remember(REPLY, 1)
