-- purge: removes every message, visible and in flight; every receipt token becomes stale. The
-- counters (dead-lettered, expired) and the creation time stay.
maintain()
local expired = pending_expired() -- expired before the purge: counted so
if expired > 0 then
  redis.call('HINCRBY', Q.meta, 'expired', expired)
end
redis.call('UNLINK', Q.ids, Q.body, Q.state, Q.vis[1], Q.vis[2], Q.vis[3], Q.vis[4], Q.inflight, Q.copies,
  Q.lanes, Q.tenants, Q.aging[1], Q.aging[2], Q.urgent, Q.sc_members, Q.sc_ages, Q.sc_classes, Q.sc_cells,
  Q.sc_heads)
redis.call('HDEL', Q.meta, 'waiting')
touch(Q)
redis.call('HSET', Q.meta, 'indexed', '1') -- nothing left that is not in the index
if score_kept(Q) then
  redis.call('HSET', Q.meta, 'scored', '1') -- the score policy's index is kept: it is whole (empty)
end
return 1
