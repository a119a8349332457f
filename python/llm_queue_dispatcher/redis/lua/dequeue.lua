-- dequeue: ARGV[5] limit, ARGV[6] visibility timeout in us, ARGV[7] the same in seconds (kept
-- as the queue's latest visibility timeout). Receives up to `limit` visible messages, priority
-- first, then oldest. Returns NOW, then per message: member, message id, receive count,
-- enqueued_at, first_received_at, receipt token, serialised request.
--
-- A resent call (its reply lost) gets the messages the first run received, those still in flight
-- under the receipt tokens it gave them, and receives no others: a receive whose reply was lost
-- leaves nothing leased to nobody.
maintain()
local out = {NOW_TEXT}
if replayed(out, REPLY) then
  return out
end
local limit = tonumber(ARGV[5])
local timeout = tonumber(ARGV[6])
if redis.call('HGET', Q.meta, 'visibility_timeout') ~= ARGV[7] then
  redis.call('HSET', Q.meta, 'visibility_timeout', ARGV[7])
end
local taken = {}
for p = 1, 4 do -- the four priorities
  if #taken >= 2 * limit then
    break
  end
  local members = live_range(p, limit - #taken / 2)
  -- Bounded by `limit`: ZRANGE returned at most the messages still wanted.
  for _, member in ipairs(members) do
    local s = load(Q, member)
    redis.call('ZREM', Q.vis[p], member)
    index_remove(Q, member, s)
    lease(out, taken, member, s, timeout)
  end
end
if #taken == 0 then
  return out
end
touch(Q)
remember(REPLY, taken)
return out
