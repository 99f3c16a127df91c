"""Property-based: schemathesis reads the live server's /openapi.json and sends random valid
(positive) and invalid (negative) requests to every operation; none may get a 5xx, and every
4xx must be one the API documents (401 never, since the token is sent)."""

from __future__ import annotations

import pytest

from tests.helpers import require_module

schemathesis = require_module("schemathesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis.generation.modes import GenerationMode  # noqa: E402

from tests.kv.serve.conftest import TOKEN  # noqa: E402

AUTH = {"Authorization": f"Bearer {TOKEN}"}
EXPECTED = {200, 404, 413, 422}


@pytest.mark.slow
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_random_requests_never_get_a_5xx(server, mode):
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json", headers=AUTH)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/health", "/tokenize", "/lookup", "/move", "/check_finish", "/pin",
                                              "/unpin", "/clear", "/metrics"}  # fmt: skip
    seen: dict[str, set[int]] = {}
    for op in operations:

        @settings(max_examples=25, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))  # fmt: skip
        @given(case=op.as_strategy(generation_mode=mode))
        def check(case) -> None:
            resp = case.call(base_url=server.url, headers=AUTH, timeout=30)
            assert resp.status_code < 500, (case.method, case.path, case.body, resp.status_code, resp.text)
            assert resp.status_code in EXPECTED, (case.method, case.path, case.body, resp.status_code, resp.text)
            seen.setdefault(op.path, set()).add(resp.status_code)

        try:
            check()
        except Unsatisfiable:  # negative mode: nothing to make invalid (GET /health, GET /metrics)
            assert mode is GenerationMode.NEGATIVE and op.method.upper() == "GET", op.path
    if mode is GenerationMode.NEGATIVE:  # invalid bodies were refused as such
        assert 422 in seen["/lookup"] and 422 in seen["/move"]
    else:
        assert 200 in seen["/lookup"] and 200 in seen["/tokenize"]
