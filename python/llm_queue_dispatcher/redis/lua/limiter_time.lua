-- The server's instant (us): what RedisThrottle reads the provider's absolute instants against.
return fmt(NOW)
