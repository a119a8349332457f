-- release: ARGV[15] request id. Gives the latest grant of that id back whole, as if it had never
-- been granted: its request to each request bucket, to each token bucket the tokens it holds, the
-- debt it paid (owed again) and the debt its adjustments added (cancelled, or given back where
-- later grants paid it), and its slot of max_concurrent.
-- The grant of that id before it, if any still counts, is the latest again. Returns 1, or 0 when
-- the id has no grant that counts. A resent call (its reply lost) releases once.
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
give_back(record, true)
save()
return remember(REPLY, 1)
