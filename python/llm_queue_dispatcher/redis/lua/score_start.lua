-- score_start: a process of the score policy's global choice announces itself (global_choice.py,
-- before its first dispatch from the queue, and before a fill of the index by score_fill.lua):
-- from now on every script keeps the score policy's index as messages become visible and stop
-- being visible (queue_common.lua, score_kept), so a fill's scan misses none, and no
-- fair_priority dispatch drops it (global_dispatch.lua).
redis.call('HSET', Q.meta, 'scoring', '1')
return 1
