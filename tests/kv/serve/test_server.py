"""`infercache kv serve` as a real subprocess on a free port: every route through `ControllerClient`
and through raw HTTP, each error case (422 naming the field, 404, 413, 401), metrics, SIGTERM.

Chunks get into the server's engine through the shared-memory hot pool: an Engine in this process
attaches to the same pool and stores, the server sees them (real cross-process sharing).
"""

from __future__ import annotations

import json
import signal

import httpx
import pytest

from infercache.kv.client import (
    ControllerBadInput,
    ControllerClient,
    NotFoundError,
    TooLargeError,
    UnauthorizedError,
    UnavailableError,
)
from tests.kv.serve.conftest import CHUNK, TOKEN, destroy_pool, random_kv, start_server, unique_tokens

AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture()
def client(server):
    with ControllerClient(server.url, token=TOKEN) as c:
        yield c


@pytest.fixture()
def raw(server):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as c:
        yield c


def test_health_is_open_and_describes_the_instance(server, client):
    data = httpx.get(server.url + "/health").json()  # no token needed
    assert data["status"] == "ok"
    assert data["instance_id"] == server.instance_id == client.instance_id
    assert data["locations"] == ["hot", "disk"]
    assert data["chunk_size"] == CHUNK
    assert data["tokenizer"] == "byte-level"


def test_tokenize_uses_the_byte_level_fallback(client, raw):
    assert client.tokenize("héllo") == list("héllo".encode())
    resp = raw.post("/tokenize", json={"prompt": "ab c"})
    assert resp.status_code == 200 and resp.json() == {"tokens": [97, 98, 32, 99]}


def test_lookup_move_check_finish_pin_clear_round_trip(server, client, raw, shared_engine):
    engine = shared_engine()
    tokens = unique_tokens(5 * CHUNK + 3, seed=1)  # 5 full chunks and a partial one (not stored)
    assert client.lookup(tokens) == {"found": False, "matched_tokens": 0, "layout_info": {}}
    assert engine.store(tokens, random_kv(len(tokens))) == 5 * CHUNK
    inst = server.instance_id
    assert client.lookup(tokens) == {"found": True, "matched_tokens": 5 * CHUNK, "layout_info": {inst: ["hot", 80]}}
    # A prefix of the prompt matches its own full chunks only.
    assert raw.post("/lookup", json={"tokens": tokens[:40]}).json()["matched_tokens"] == 2 * CHUNK

    # Move hot -> disk in the background (client), then back (raw HTTP, with the gpu alias).
    event = client.move([inst, "hot"], [inst, "disk"], tokens)
    assert event["num_tokens"] == 5 * CHUNK and isinstance(event["event_id"], str)
    assert client.wait(event["event_id"], timeout=30) == {"status": "finished", "num_tokens": 5 * CHUNK}
    assert client.lookup(tokens)["layout_info"] == {inst: ["disk", 80]}
    assert engine.lookup(tokens) == 0  # gone from the shared pool: the server really moved it
    resp = raw.post("/move", json={"old_position": [inst, "disk"], "new_position": [inst, "gpu"], "tokens": tokens,
                                   "copy": True})  # fmt: skip
    assert resp.status_code == 200
    event_id = resp.json()["event_id"]
    status = client.wait(event_id, timeout=30)
    assert status["status"] == "finished"
    assert raw.post("/check_finish", json={"event_id": event_id}).json() == status
    assert client.lookup(tokens)["layout_info"] == {inst: ["hot", 80]}  # a copy: hot is the fastest holder
    assert engine.lookup(tokens) == 5 * CHUNK

    # Pin and unpin (client and raw); then clear one tier, then everything.
    assert client.pin(tokens, location="hot") == {"instance_id": inst, "location": "hot", "num_tokens": 80}
    assert raw.post("/pin", json={"tokens": tokens}).json()["num_tokens"] == 80
    assert client.unpin(tokens)["num_tokens"] == 80
    cleared = raw.post("/clear", json={"location": "disk"}).json()
    assert cleared == {"instance_id": inst, "location": "disk", "num_chunks": 5}
    assert client.lookup(tokens)["layout_info"] == {inst: ["hot", 80]}
    assert client.clear()["num_chunks"] >= 5
    assert client.lookup(tokens)["found"] is False


def test_metrics_expose_tier_counters_and_latency(server, client, raw, shared_engine):
    engine = shared_engine()
    tokens = unique_tokens(2 * CHUNK, seed=2)
    engine.store(tokens, random_kv(len(tokens)))
    client.lookup(tokens)
    for i in range(3):  # made-up methods must not each get a metric series (unbounded label values)
        raw.request(f"BREW{i}", "/lookup")
    text = client.metrics()
    inst = server.instance_id
    assert 'method="BREW' not in text and 'method="other",route="/lookup"' in text
    for tier in ("hot", "disk"):
        for name in ("hits_total", "misses_total", "stores_total", "evictions_total", "errors_total"):
            assert f'infercache_kv_{name}{{kv_instance="{inst}",tier="{tier}"}}' in text
        assert f'infercache_kv_bytes{{kv_instance="{inst}",tier="{tier}"}}' in text
    assert f'infercache_kv_request_duration_seconds_bucket{{kv_instance="{inst}",le="0.01",route="/lookup"}}' in text
    assert f'infercache_kv_requests_total{{kv_instance="{inst}",method="POST",route="/lookup",status="200"}}' in text
    hot_bytes = [ln for ln in text.splitlines() if ln.startswith(f'infercache_kv_bytes{{kv_instance="{inst}",tier="hot"}}')]
    assert float(hot_bytes[0].split()[-1]) > 0
    resp = raw.get("/metrics")
    assert resp.headers["content-type"].startswith("text/plain")
    from prometheus_client.parser import text_string_to_metric_families

    families = {f.name: f for f in text_string_to_metric_families(resp.text)}  # valid exposition format
    assert {"infercache_kv_hits", "infercache_kv_bytes", "infercache_kv_request_duration_seconds"} <= set(families)


def test_grafana_dashboard_queries_only_exported_metrics(client):
    """Every metric the shipped dashboard queries exists in /metrics (names cannot drift apart)."""
    import re
    from pathlib import Path

    dashboard = json.loads((Path(__file__).parents[3] / "deploy" / "grafana" / "infercache-kv.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"\b(infercache_kv_[a-z_]+)", e)}
    exported = set(re.findall(r"^(infercache_kv_[a-z_]+)", client.metrics(), re.M))
    assert len(used) >= 8 and used <= exported, used - exported
    assert all("kv_instance" in e for e in exprs)


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}, {"Authorization": TOKEN}],
    ids=["none", "wrong", "basic", "no-scheme"],
)
def test_every_route_but_health_needs_the_token(server, headers):
    with httpx.Client(base_url=server.url, headers=headers) as c:
        assert c.get("/health").status_code == 200
        for method, path in [("POST", "/tokenize"), ("POST", "/lookup"), ("POST", "/move"),
                             ("POST", "/check_finish"), ("POST", "/pin"), ("POST", "/clear"),
                             ("GET", "/metrics"), ("GET", "/openapi.json")]:  # fmt: skip
            resp = c.request(method, path, json={"tokens": [1]})
            assert resp.status_code == 401, (path, resp.text)
            assert resp.headers["www-authenticate"] == "Bearer"
    with pytest.raises(UnauthorizedError):
        ControllerClient(server.url, token="wrong").lookup([1, 2])


@pytest.mark.parametrize(
    "path,body,field",
    [
        ("/lookup", {"tokens": "abc"}, "tokens"),
        ("/lookup", {"tokens": [1, "2"]}, "tokens.1"),
        ("/lookup", {"tokens": [1, -2]}, "tokens.1"),
        ("/lookup", {"tokens": [1.5]}, "tokens.0"),
        ("/lookup", {"tokens": [True]}, "tokens.0"),
        ("/lookup", {"tokens": [2**40]}, "tokens.0"),
        ("/lookup", {}, "tokens"),
        ("/tokenize", {"prompt": 3}, "prompt"),
        ("/move", {"old_position": ["a"], "new_position": ["a", "disk"], "tokens": [1]}, "old_position"),
        ("/move", {"old_position": ["a", "hot"], "new_position": ["a", "disk"], "tokens": [1], "copy": "yes"}, "copy"),
        ("/check_finish", {"event_id": 7}, "event_id"),
        ("/pin", {"tokens": [1], "location": 5}, "location"),
        ("/clear", {"location": ["hot"]}, "location"),
    ],
)
def test_wrong_types_are_422_naming_the_field(raw, path, body, field):
    resp = raw.post(path, json=body)
    assert resp.status_code == 422, resp.text
    data = resp.json()
    assert field in data["error"], data
    assert any(".".join(e["loc"][1:]).startswith(field) for e in data["detail"])


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b"null", b'{"tokens": [1,', b"\x00\x00", b"\xff\xfe{}"])
def test_malformed_json_is_422(raw, content):
    resp = raw.post("/lookup", content=content, headers={"content-type": "application/json"})
    assert resp.status_code == 422, resp.text


def test_unknown_location_instance_and_event_are_404(server, client, raw):
    inst = server.instance_id
    cases = [
        ("/move", {"old_position": [inst, "tape"], "new_position": [inst, "disk"], "tokens": [1]}, "unknown location"),
        ("/move", {"old_position": [inst, "hot"], "new_position": [inst, "remote"], "tokens": [1]}, "not configured"),
        ("/move", {"old_position": ["other@1@0", "hot"], "new_position": [inst, "disk"], "tokens": [1]},
         "unknown instance"),
        ("/check_finish", {"event_id": "no-such-event"}, "unknown event"),
        ("/pin", {"tokens": [1], "location": "floppy"}, "unknown location"),
        ("/clear", {"location": "remote"}, "not configured"),
        ("/clear", {"location": "hot", "instance_id": "other@1@0"}, "unknown instance"),
    ]  # fmt: skip
    for path, body, message in cases:
        resp = raw.post(path, json=body)
        assert resp.status_code == 404, (path, body, resp.text)
        assert message in resp.json()["detail"]
    with pytest.raises(NotFoundError, match="unknown event"):
        client.check_finish("nope")
    with pytest.raises(NotFoundError, match="unknown location"):
        client.move("hot", "tape", [1, 2, 3])


def test_over_the_token_limit_is_413(client, raw):
    tokens = list(range(4097))  # the fixture's server allows 4096
    assert raw.post("/lookup", json={"tokens": tokens}).status_code == 413
    assert raw.post("/pin", json={"tokens": tokens}).status_code == 413
    assert raw.post("/tokenize", json={"prompt": "x" * 4097}).status_code == 413
    with pytest.raises(TooLargeError, match="4097 tokens"):
        client.lookup(tokens)
    assert raw.post("/lookup", json={"tokens": tokens[:4096]}).status_code == 200
    # A body beyond what the token limit could need is refused before it is parsed.
    resp = raw.post("/lookup", content=b'{"tokens": [' + b"1, " * 800_000 + b"1]}",
                    headers={"content-type": "application/json"})  # fmt: skip
    assert resp.status_code == 413


def test_client_maps_errors_and_unreachable_server(client):
    with pytest.raises(ControllerBadInput):
        client.lookup(["x"])  # refused client-side, same class as the server's 422
    with pytest.raises(UnavailableError, match="cannot reach"):
        ControllerClient(port=1).health()
    assert "token" not in repr(ControllerClient(port=1, token="secret-value")).lower().replace("controllerclient", "")


@pytest.mark.slow
def test_sigterm_finishes_pending_moves_and_exits_cleanly(tmp_path):
    """A move in flight at SIGTERM is finished (or reported failed); the process exits 0.

    This server takes its token from INFERCACHE_API_TOKEN (the others from --token)."""
    srv = start_server(tmp_path / "srv", token=None, env={"INFERCACHE_API_TOKEN": "from-env"})
    assert "token required" in srv.output[0]
    assert httpx.post(srv.url + "/lookup", json={"tokens": [1]}).status_code == 401
    try:
        from infercache.kv.config import EngineConfig
        from infercache.kv.engine import Engine

        cfg = {k: v for k, v in srv.config.items() if k not in ("local_disk", "local_disk_size")}
        with Engine(EngineConfig(**cfg)) as engine:
            tokens = unique_tokens(64 * CHUNK, seed=3)
            engine.store(tokens, random_kv(len(tokens), layers=4, hidden=256))
        with ControllerClient(srv.url, token="from-env") as c:
            inst = c.instance_id
            events = [c.move([inst, "hot"], [inst, "disk"], tokens)["event_id"]]
            events.append(c.move([inst, "disk"], [inst, "hot"], tokens, copy=True)["event_id"])
        code, out = srv.stop(signal.SIGTERM)
        assert code == 0, out
        assert "stopped (" in out and "engine closed" in out, out
        summary = out.split("stopped (", 1)[1]
        finished, failed = int(summary.split()[0]), int(summary.split("finished, ")[1].split()[0])
        assert failed == 0 and finished <= 2, out  # moves still pending at SIGTERM were completed
        # Both moves completed and the disk writes were drained: after a restart, with the shared hot
        # pool cleared, the whole prefix is served from disk.
        srv2 = start_server(tmp_path / "srv", token=None, name=srv.name)
        try:
            with ControllerClient(srv2.url) as c:
                c.clear("hot")
                assert c.lookup(tokens) == {"found": True, "matched_tokens": 64 * CHUNK,
                                            "layout_info": {inst: ["disk", 64 * CHUNK]}}  # fmt: skip
        finally:
            assert srv2.stop()[0] == 0
    finally:
        srv.stop(signal.SIGKILL)
        destroy_pool(srv.name, srv.data_dir)


def test_openapi_schema_lists_every_route(raw):
    schema = raw.get("/openapi.json").json()
    assert {"/health", "/tokenize", "/lookup", "/move", "/check_finish", "/pin", "/clear", "/metrics"} <= set(
        schema["paths"]
    )
    assert json.dumps(schema)  # plain JSON


def test_cli_refuses_bad_settings_before_serving(tmp_path, data_dir):
    import socket

    from tests.helpers import run_cli

    def said(result):  # stderr as one line (Rich wraps long messages)
        return " ".join(result.stderr.split())

    missing = run_cli("kv", "serve", "--port", "0", "--config", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2 and "does not exist" in said(missing)
    bad = tmp_path / "bad.yaml"
    bad.write_text("chunk_size: 0\n")
    assert run_cli("kv", "serve", "--port", "0", "--config", str(bad)).returncode == 2
    tok = run_cli("kv", "serve", "--port", "0", "--tokenizer", str(tmp_path / "no-tokenizer"))
    assert tok.returncode == 2 and "tokenizer not found" in said(tok)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        taken = run_cli("kv", "serve", "--port", str(port))
    assert taken.returncode == 1 and "cannot listen" in said(taken)
