-- dequeue: ARGV[5] limit, ARGV[6] visibility timeout in us, ARGV[7] the same in seconds (kept
-- as the queue's latest visibility timeout). Receives up to `limit` visible messages, priority
-- first, then oldest. Returns, per message: member, message id, receive count, enqueued_at,
-- first_received_at, receipt token, serialised request.
maintain()
local limit = tonumber(ARGV[5])
local timeout = tonumber(ARGV[6])
if redis.call('HGET', Q.meta, 'visibility_timeout') ~= ARGV[7] then
  redis.call('HSET', Q.meta, 'visibility_timeout', ARGV[7])
end
local out = {}
local taken = 0
for p = 1, 4 do
  if taken >= limit then
    break
  end
  local members = redis.call('ZRANGE', Q.vis[p], 0, limit - taken - 1)
  for _, member in ipairs(members) do
    local s = load(Q, member)
    redis.call('ZREM', Q.vis[p], member)
    s.rc = s.rc + 1
    if s.first < 0 then
      s.first = NOW
    end
    s.token = fresh()
    save(Q, member, s)
    redis.call('ZADD', Q.inflight, fmt(NOW + timeout), member)
    out[#out + 1] = member
    out[#out + 1] = s.mid
    out[#out + 1] = s.rc
    out[#out + 1] = s.at
    out[#out + 1] = s.first
    out[#out + 1] = s.token
    out[#out + 1] = redis.call('HGET', Q.body, member)
    taken = taken + 1
  end
end
if taken > 0 then
  touch(Q)
end
return out
