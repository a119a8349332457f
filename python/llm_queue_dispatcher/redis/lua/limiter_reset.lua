-- reset: full buckets, no history, no debt, no penalty, no request in flight.
redis.call('DEL', STATE, GRANTS, ORDER, LATEST, HELD)
return 1
