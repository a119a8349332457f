-- get_queue_attributes: NOW, visible, in flight, created, modified, latest visibility timeout (''
-- if none yet), dead-lettered, expired, then the visible count of each priority.
maintain()
local out = {fmt(NOW), 0, redis.call('ZCARD', Q.inflight)}
local meta = redis.call('HMGET', Q.meta, 'created', 'modified', 'visibility_timeout', 'dead', 'expired')
out[4] = meta[1]
out[5] = meta[2] or meta[1]
out[6] = meta[3] or ''
out[7] = meta[4] or '0'
out[8] = fmt(tonumber(meta[5] or '0') + pending_expired())
for p = 1, 4 do -- the four priorities
  local n = live_count(p)
  out[2] = out[2] + n
  out[8 + p] = n
end
return out
