-- score_start: the first step of filling the score policy's index (global_choice.py, before
-- score_fill.lua): from now on every script keeps the index as messages become visible and stop
-- being visible (queue_common.lua, score_kept), so the fill's scan misses none.
redis.call('HSET', Q.meta, 'scoring', '1')
return 1
