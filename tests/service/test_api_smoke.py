"""Smoke: the server starts, answers health checks and authenticates."""


def test_healthz_and_readyz(api_server):
    with api_server.client() as c:
        assert c.get("/healthz").json() == {"status": "ok"}
        r = c.get("/readyz")
        assert r.status_code == 200, r.text
