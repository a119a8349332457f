-- dequeue: ARGV[5] limit, ARGV[6] visibility timeout in us, ARGV[7] the same in seconds (kept
-- as the queue's latest visibility timeout). Receives up to `limit` visible messages, priority
-- first, then oldest. Returns NOW, then per message: member, message id, receive count,
-- enqueued_at, first_received_at, receipt token, serialised request.
--
-- A resent call (its reply lost) gets the messages the first run received, those still in flight
-- under the receipt tokens it gave them, and receives no others: a receive whose reply was lost
-- leaves nothing leased to nobody.
local function received(out, member, s)
  out[#out + 1] = member
  out[#out + 1] = s.mid
  out[#out + 1] = s.rc
  out[#out + 1] = s.at
  out[#out + 1] = s.first
  out[#out + 1] = s.token
  out[#out + 1] = redis.call('HGET', Q.body, member)
end

maintain()
local out = {fmt(NOW)}
local kept = recalled(REPLY)
if kept ~= nil then
  -- Bounded by the messages the first run received (member, token pairs).
  for i = 1, #kept, 2 do
    local s = holder(kept[i], kept[i + 1])
    if s ~= nil and redis.call('ZSCORE', Q.inflight, kept[i]) then
      received(out, kept[i], s)
    end
  end
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
    s.rc = s.rc + 1
    if s.first < 0 then
      s.first = NOW
    end
    s.token = fresh()
    save(Q, member, s)
    redis.call('ZADD', Q.inflight, fmt(NOW + timeout), member)
    received(out, member, s)
    taken[#taken + 1] = member
    taken[#taken + 1] = s.token
  end
end
if #taken == 0 then
  return out
end
touch(Q)
remember(REPLY, taken)
return out
