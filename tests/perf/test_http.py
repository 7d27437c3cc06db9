"""The HTTP benchmark's haproxy origin and proxy configs."""


def test_http_haproxy_configs(tmp_path):
    from shoal.perf import http
    body = http.body_file(tmp_path)
    assert body.stat().st_size == http.BODY_SIZE
    origin = http.origin_config(18080, body)
    assert "bind 0.0.0.0:18080" in origin and f"file {body}" in origin and "nbthread 1" in origin
    proxy = http.proxy_config("0.0.0.0:18081", "10.244.2.10:18080", threads=1)
    assert "mode http" in proxy and "server origin 10.244.2.10:18080" in proxy
