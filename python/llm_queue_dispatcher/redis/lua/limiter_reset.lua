-- reset: full buckets, no history, no debt, no penalty, no ceiling.
redis.call('DEL', STATE, GRANTS, ORDER, LATEST)
return 1
