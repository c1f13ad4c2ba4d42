"""Security, sessions and limits against the live server: admin API, Host/Origin and CORS,
rate limits, concurrency, slow bodies, bridge violations, and the audit trail."""

from __future__ import annotations

import json
import logging
from functools import partial
from typing import Any

import httpx
import pytest
import trio
import trio_websocket

from support import (
    API_KEY,
    BRIDGE_TOKEN,
    RawHTTP,
    audit_events,
    chat_body,
    make_settings,
    sse_payloads,
    start_server,
    wait_until,
)
from trioprovider import protocol
from trioprovider.agents.echo import EchoAgent
from trioprovider.agents.runner import run_agent
from trioprovider.app import create_app
from trioprovider.guard import RequestGuard
from trioprovider.model_routes import ModelRoutes
from trioprovider.server import Running

ADMIN = "admin-token-for-tests"
KEY = {"Authorization": f"Bearer {API_KEY}"}


def client(running: Running, **headers: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=running.provider_url, headers={**KEY, **headers}, timeout=30)


async def start_with_agent(nursery: trio.Nursery, agent: EchoAgent, **settings: Any) -> Running:
    running = await start_server(nursery, make_settings(**settings))
    nursery.start_soon(partial(run_agent, agent, running.bridge_url, BRIDGE_TOKEN, reconnect_delay=0.1))
    await wait_until(lambda: running.provider.bridge.agents())
    return running


async def test_admin_api_needs_its_own_token() -> None:
    async with trio.open_nursery() as nursery:
        off = await start_server(nursery)
        async with client(off) as http:
            response = await http.get("/admin/sessions")
            assert response.status_code == 403
            assert response.json()["error"]["code"] == "admin_disabled"
        running = await start_server(nursery, make_settings(**{"security.admin_token": ADMIN}))
        async with client(running) as http:
            # An API key is not an admin token.
            response = await http.get("/admin/sessions")
            assert response.status_code == 401
            assert response.headers["www-authenticate"] == "Bearer"
            assert response.json()["error"]["type"] == "authentication_error"
            ok = await http.get("/admin/sessions", headers={"Authorization": f"Bearer {ADMIN}"})
            assert ok.status_code == 200 and ok.json()["data"] == []
        failures = [r for r in audit_events(running, "authentication") if not r["success"]]
        assert failures and failures[0]["path"] == "/admin/sessions" and API_KEY not in json.dumps(failures)
        off.shutdown.set()
        running.shutdown.set()


async def test_admin_lists_sessions_and_agents_and_revokes() -> None:
    async with trio.open_nursery() as nursery:
        agent = EchoAgent(tokens=3)
        running = await start_with_agent(nursery, agent, **{"security.admin_token": ADMIN})
        admin = {"Authorization": f"Bearer {ADMIN}"}
        async with client(running) as http:
            pinned = await http.post("/v1/chat/completions", content=chat_body(stream=False), headers={"X-Session-Id": "pinned-1"})
            own = await http.post("/v1/chat/completions", content=chat_body(stream=False))
            assert pinned.headers["x-session-id"] == "pinned-1"
            assert own.headers["x-session-id"].startswith("sess_")
            listed = (await http.get("/admin/sessions", headers=admin)).json()["data"]
            assert {s["id"] for s in listed} == {"pinned-1", own.headers["x-session-id"]}
            assert all(s["owner"] == "test@127.0.0.1" and s["active_requests"] == 0 for s in listed)
            agents = (await http.get("/admin/agents", headers=admin)).json()["data"]
            assert agents[0]["agent_id"] == agent.agent_id and agents[0]["in_flight"] == 0
            assert [m["id"] for m in agents[0]["models"]] == ["echo"]

            missing = await http.delete("/admin/sessions/nope", headers=admin)
            assert missing.status_code == 404 and missing.json()["error"]["code"] == "session_not_found"
            gone = await http.delete("/admin/sessions/pinned-1", headers=admin)
            assert gone.status_code == 200 and gone.json()["revoked"] is True
            assert [s["id"] for s in (await http.get("/admin/sessions", headers=admin)).json()["data"]] == [own.headers["x-session-id"]]
            everything = await http.post("/admin/revoke_all_sessions", headers=admin)
            assert everything.json()["revoked"] == 1
            assert (await http.get("/admin/sessions", headers=admin)).json()["data"] == []
        revoked = audit_events(running, "session_revoked")
        assert [r["session_id"] for r in revoked] == ["pinned-1", own.headers["x-session-id"]]
        running.shutdown.set()
        nursery.cancel_scope.cancel()


async def test_revoking_a_session_ends_its_live_stream_and_cancels_the_agent() -> None:
    async with trio.open_nursery() as nursery:
        agent = EchoAgent(tokens=1000, delay=0.02)
        running = await start_with_agent(nursery, agent, **{"security.admin_token": ADMIN})
        stream = await RawHTTP.post(running.provider_url, "/v1/chat/completions", chat_body(), headers={"X-Session-Id": "live-1"})
        await stream.read_until(b'"content":" there"')
        async with client(running) as http:
            response = await http.delete("/admin/sessions/live-1", headers={"Authorization": f"Bearer {ADMIN}"})
            assert response.json()["stopped_requests"] == 1
        with trio.fail_after(10):
            await stream.read_until(b"data: [DONE]")
            await agent.cancel_arrived.wait()
        payloads = sse_payloads(stream.received)
        assert payloads[-1] == b"[DONE]"
        error = json.loads(payloads[-2])["error"]
        assert error["code"] == "session_revoked"
        await wait_until(lambda: not running.provider.scopes and running.provider.gate.limiter.open_reservations == 0)
        outcomes = [r["outcome"] for r in audit_events(running, "model_request")]
        assert outcomes == ["session_revoked"]
        running.shutdown.set()
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ({"Host": "evil.example"}, "forbidden_host"),
        ({"Host": "rebind.attacker.test:{port}"}, "forbidden_host"),
        ({"Host": "127.0.0.1:1"}, "forbidden_host"),
        ({"Origin": "https://evil.example"}, "forbidden_origin"),
        ({"Origin": "null"}, "forbidden_origin"),
    ],
)
async def test_bad_host_or_origin_is_403_and_audited(headers: dict[str, str], code: str) -> None:
    async with trio.open_nursery() as nursery:
        running = await start_server(nursery)
        port = running.provider_url.rsplit(":", 1)[1]
        sent = {name: value.format(port=port) for name, value in headers.items()}
        async with client(running, **sent) as http:
            for path in ("/health", "/v1/models"):
                response = await http.get(path)
                assert response.status_code == 403, path
                assert response.json()["error"]["code"] == code
        violations = audit_events(running, "security_violation")
        assert len(violations) == 2 and violations[0]["kind"] in ("bad_host", "bad_origin")
        running.shutdown.set()


async def test_loopback_hosts_and_allowed_origins_pass_with_cors_headers() -> None:
    async with trio.open_nursery() as nursery:
        running = await start_server(nursery)
        port = running.provider_url.rsplit(":", 1)[1]
        async with client(running) as http:
            for host in (f"localhost:{port}", f"127.0.0.1:{port}", "localhost"):
                assert (await http.get("/health", headers={"Host": host})).status_code == 200
            origin = "http://localhost:5173"
            response = await http.get("/v1/models", headers={"Origin": origin})
            assert response.status_code == 200
            assert response.headers["access-control-allow-origin"] == origin
            assert "x-ratelimit-remaining-requests" in response.headers["access-control-expose-headers"].lower()
            preflight = await http.request(
                "OPTIONS",
                "/v1/chat/completions",
                headers={"Origin": origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization, content-type"},
            )
            assert preflight.status_code == 204
            assert preflight.headers["access-control-allow-origin"] == origin
            assert "POST" in preflight.headers["access-control-allow-methods"]
            assert preflight.headers["access-control-allow-headers"] == "authorization, content-type"
            refused = await http.request(
                "OPTIONS", "/v1/chat/completions", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
            )
            assert refused.status_code == 403 and "access-control-allow-origin" not in refused.headers
        running.shutdown.set()


async def test_rate_limit_gives_429_with_a_correct_retry_after() -> None:
    async with trio.open_nursery() as nursery:
        # 6 requests a minute, no burst: one new request every 10 seconds once the 6 are spent.
        running = await start_with_agent(
            nursery, EchoAgent(tokens=2), **{"rate_limiting.requests_per_minute": 6, "rate_limiting.burst_allowance": 0}
        )
        async with client(running) as http:
            started = trio.current_time()
            for sent in range(6):
                ok = await http.post("/v1/chat/completions", content=chat_body(stream=False))
                assert ok.status_code == 200
                assert ok.headers["x-ratelimit-limit-requests"] == "6"
                assert ok.headers["x-ratelimit-remaining-requests"] == str(5 - sent)
            refused = await http.post("/v1/chat/completions", content=chat_body(stream=False))
            elapsed = trio.current_time() - started
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
        assert refused.json()["error"]["type"] == "rate_limit_error"
        retry_after = int(refused.headers["retry-after"])
        # The next token is 10 s after the first request, minus the time the requests took.
        assert 10 - elapsed - 1 <= retry_after <= 10
        assert refused.headers["x-ratelimit-remaining-requests"] == "0"
        limited = audit_events(running, "rate_limit_exceeded")
        assert len(limited) == 1 and limited[0]["key"] == "test" and limited[0]["retry_after"] == str(retry_after)
        # Refused requests hold nothing.
        assert running.provider.gate.limiter.open_reservations == 0 and not running.provider.scopes
        running.shutdown.set()
        nursery.cancel_scope.cancel()


async def test_max_concurrent_requests_queues_briefly_then_503() -> None:
    async with trio.open_nursery() as nursery:
        agent = EchoAgent(tokens=1000, delay=0.02)
        running = await start_with_agent(
            nursery, agent, **{"performance.max_concurrent_requests": 1, "performance.queue_timeout": 0.3}
        )
        first = await RawHTTP.post(running.provider_url, "/v1/chat/completions", chat_body())
        await first.read_until(b'"content"')
        async with client(running) as http:
            busy = await http.post("/v1/chat/completions", content=chat_body(stream=False))
            assert busy.status_code == 503
            assert busy.json()["error"]["code"] == "server_busy" and busy.headers["retry-after"] == "1"
            # The refused request took no session slot and no budget.
            assert running.provider.gate.sessions.active_requests == 1
            await first.hang_up()
            await wait_until(lambda: not running.provider.scopes)
            # With time to wait, a request queues for the slot and runs as soon as it frees.
            running.provider.settings.performance.queue_timeout = 30
            second = await RawHTTP.post(running.provider_url, "/v1/chat/completions", chat_body())
            await second.read_until(b'"content"')
            results: list[httpx.Response] = []

            async def queued() -> None:
                body = chat_body(stream=False, max_tokens=3)
                results.append(await http.post("/v1/chat/completions", content=body))

            nursery.start_soon(queued)
            await wait_until(lambda: running.provider.capacity.statistics().tasks_waiting == 1)
            await second.hang_up()
            await wait_until(lambda: bool(results))
            assert results[0].status_code == 200
        await wait_until(lambda: not running.provider.scopes and running.provider.capacity.borrowed_tokens == 0)
        running.shutdown.set()
        nursery.cancel_scope.cancel()


async def test_a_slow_body_gets_408_and_holds_up_nobody() -> None:
    async with trio.open_nursery() as nursery:
        running = await start_with_agent(nursery, EchoAgent(tokens=2), **{"provider.body_timeout": 0.5})
        host, port = running.provider_url.removeprefix("http://").rsplit(":", 1)
        slow = await trio.open_tcp_stream(host, int(port))
        head = (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {API_KEY}\r\n"
            "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
        )
        await slow.send_all(head.encode() + b'{"model": "echo", ')
        async with client(running) as http:
            # Served while the slow body is still arriving.
            assert (await http.post("/v1/chat/completions", content=chat_body(stream=False))).status_code == 200
        raw = RawHTTP(slow)
        with trio.fail_after(10):
            answer = await raw.read_until(b"}}")
        assert answer.startswith(b"HTTP/1.1 408")
        assert b'"timeout_error"' in answer
        assert not running.provider.scopes and running.provider.gate.sessions.active_requests == 0
        running.shutdown.set()
        nursery.cancel_scope.cancel()


async def test_a_body_ending_just_as_its_deadline_passes_still_gets_an_answer() -> None:
    """The body's last message is taken in the very instant the body timeout strikes (the
    receive's own shielded schedule point spans the deadline): the request scope is cancelled
    for good, and the client must hear so (408) rather than get no answer at all."""
    async with trio.open_nursery() as nursery:
        running = await start_with_agent(nursery, EchoAgent(tokens=2), **{"provider.body_timeout": 0.5})
        provider = running.provider
        app = RequestGuard(ModelRoutes(provider, create_app(provider)), provider, access_log=None)
        body = chat_body(stream=False)
        port = int(running.provider_url.rsplit(":", 1)[1])
        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
            "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions", "query_string": b"", "root_path": "",
            "headers": [(b"host", f"127.0.0.1:{port}".encode()), (b"authorization", f"Bearer {API_KEY}".encode()),
                        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            "client": ("127.0.0.1", 40000), "server": ("127.0.0.1", port),
        }  # fmt: skip
        taken = False

        async def receive() -> dict[str, Any]:
            nonlocal taken
            if taken:
                await trio.sleep_forever()
            # As a channel's receive with the message already there: taken, then a shielded
            # schedule point; this one lasts past the body deadline.
            await trio.lowlevel.checkpoint_if_cancelled()
            taken = True
            with trio.CancelScope(shield=True):
                await trio.sleep(0.6)
            return {"type": "http.request", "body": body, "more_body": False}

        sent: list[dict[str, Any]] = []

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        with trio.fail_after(5):
            await app(scope, receive, send)
        assert sent and sent[0]["type"] == "http.response.start" and sent[0]["status"] == 408
        assert b'"request_timeout"' in sent[-1]["body"]
        assert not provider.scopes and provider.gate.sessions.active_requests == 0
        running.shutdown.set()
        nursery.cancel_scope.cancel()


async def test_bridge_rejects_and_audits_bad_tokens_and_oversize_frames() -> None:
    async with trio.open_nursery() as nursery:
        running = await start_server(nursery, make_settings(**{"mcp.max_frame_bytes": 4096}))
        hello = protocol.AgentHello(
            id="h", protocol_version=protocol.PROTOCOL_VERSION, agent_id="intruder", token="wrong",
            models=[protocol.ModelCard(id="m")], max_concurrency=1,
        )
        async with trio_websocket.open_websocket_url(running.bridge_url) as ws:
            await ws.send_message(protocol.encode(hello))
            reply = protocol.decode(await ws.get_message())
            assert isinstance(reply, protocol.HelloReject) and "token" in reply.reason
            with pytest.raises(trio_websocket.ConnectionClosed):
                await ws.get_message()
        # A valid agent that then sends one frame over the limit is cut off with 1009.
        good = hello.model_copy(update={"token": BRIDGE_TOKEN, "agent_id": "bulky"})
        async with trio_websocket.open_websocket_url(running.bridge_url) as ws:
            await ws.send_message(protocol.encode(good))
            assert isinstance(protocol.decode(await ws.get_message()), protocol.HelloAck)
            await ws.send_message("x" * 10_000)
            with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                while True:
                    await ws.get_message()
            assert closed.value.reason.code == 1009
        await wait_until(lambda: len(audit_events(running, "security_violation")) == 2)
        kinds = [r["kind"] for r in audit_events(running, "security_violation")]
        assert kinds == ["bridge_hello", "bridge_oversize_frame"]
        assert not running.provider.bridge.agents()
        running.shutdown.set()


async def test_a_distinctive_prompt_never_reaches_any_log(caplog: pytest.LogCaptureFixture) -> None:
    secret = "ZEBRA-prompt-7f3a91-never-logged"
    caplog.set_level(logging.DEBUG)
    async with trio.open_nursery() as nursery:
        running = await start_with_agent(
            nursery, EchoAgent(tokens=50), **{"logging.access_log": True, "logging.level": "DEBUG", "ollama.listen": "127.0.0.1:0"}
        )
        async with client(running) as http:
            for stream in (False, True):
                body = chat_body(f"please repeat {secret}", stream=stream)
                answer = await http.post("/v1/chat/completions", content=body)
                assert secret.split("-")[0] in answer.text  # the echo agent answers with it
            completion = {"model": "echo", "prompt": f"def {secret}():", "suffix": f"# {secret}", "max_tokens": 20}
            assert (await http.post("/v1/completions", json=completion)).status_code == 200
            bad = await http.post("/v1/chat/completions", json={"model": "echo", "messages": [{"role": "user", "content": secret}], "temperature": 9})
            assert bad.status_code == 400
        assert running.ollama_url is not None
        async with httpx.AsyncClient(base_url=running.ollama_url, timeout=30) as ollama:
            reply = await ollama.post("/api/chat", json={"model": "echo", "messages": [{"role": "user", "content": secret}]})
            assert reply.status_code == 200
        await wait_until(lambda: not running.provider.scopes)
        running.shutdown.set()
        nursery.cancel_scope.cancel()
    audit = json.dumps(audit_events(running))
    assert "model_request" in audit and "authentication" in audit
    assert secret not in audit
    assert secret not in caplog.text
    assert all(secret not in str(record.args) for record in caplog.records)


async def test_log_prompts_true_is_the_one_way_prompts_reach_the_log(caplog: pytest.LogCaptureFixture) -> None:
    secret = "OKAPI-prompt-2c9e-logged-on-request"
    caplog.set_level(logging.INFO)
    async with trio.open_nursery() as nursery:
        running = await start_with_agent(nursery, EchoAgent(tokens=2), **{"logging.log_prompts": True})
        async with client(running) as http:
            assert (await http.post("/v1/chat/completions", content=chat_body(secret, stream=False))).status_code == 200
        running.shutdown.set()
        nursery.cancel_scope.cancel()
    assert any(record.name == "trioprovider.prompts" and secret in record.getMessage() for record in caplog.records)
    assert secret not in json.dumps(audit_events(running))
