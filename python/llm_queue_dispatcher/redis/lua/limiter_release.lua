-- release: ARGV[8] request id. Gives the latest grant of that id back whole, as if it had never
-- been granted: its request, the tokens it holds, the debt it paid (owed again), and the debt its
-- adjustments added (cancelled, or given back where later grants paid it). A provider ceiling is
-- not raised by it. The grant of that id before it, if any still counts, is the latest again.
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
refill(REQUESTS)
refill(TOKENS)
refund(REQUESTS, 1)
refund(TOKENS, record.held)
give_back_owed(record.owed)
DEBT = DEBT + record.debt
if DEBT < DEBT_DUST then
  DEBT = 0
end
release_record(record)
save()
return remember(REPLY, 1)
