-- get_queue_attributes: visible, in flight, created, modified, latest visibility timeout ('' if
-- none yet), dead-lettered, expired, then the visible count of each priority.
maintain()
local out = {0, redis.call('ZCARD', Q.inflight)}
local meta = redis.call('HMGET', Q.meta, 'created', 'modified', 'visibility_timeout', 'dead', 'expired')
out[3] = meta[1]
out[4] = meta[2] or meta[1]
out[5] = meta[3] or ''
out[6] = meta[4] or '0'
out[7] = meta[5] or '0'
for p = 1, 4 do
  local n = redis.call('ZCARD', Q.vis[p])
  out[1] = out[1] + n
  out[7 + p] = n
end
return out
