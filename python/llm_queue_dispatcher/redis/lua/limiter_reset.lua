-- reset: full buckets, no history, no debt, no penalty, no ceiling.
redis.call('DEL', STATE, HISTORY, ORDER)
return 1
