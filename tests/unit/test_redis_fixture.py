import redis


def test_real_redis_server_answers(redis_url):
    r = redis.Redis.from_url(redis_url)
    r.set("k", "v")
    assert r.get("k") == b"v"
    assert r.info("server")["redis_version"]
