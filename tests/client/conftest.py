"""Fixtures of the drop-in client tests: the Redis server of the Redis tests, the fake providers."""

from __future__ import annotations

from tests.redis.conftest import redis_url, shared_server

__all__ = ["redis_url", "shared_server"]
