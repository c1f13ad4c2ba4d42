"""The model routes on plain ASGI (trioprovider.model_routes): what a framework used to do for
them, done here, on a live server with real sockets: methods, CORS, body limits and framing,
connection reuse after an early refusal, clients that leave while sending."""

from __future__ import annotations

import json

import httpx
import trio

from support import API_KEY, chat_body, make_settings, start_server, wait_until


def _headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {API_KEY}"}


async def test_methods_other_than_post_get_405_or_options() -> None:
    settings = make_settings(**{"security.allowed_origins": ["http://127.0.0.1:*"]})
    async with trio.open_nursery() as nursery:
        running = await start_server(nursery, settings, agents=("echo",))
        async with httpx.AsyncClient(base_url=running.provider_url, headers=_headers()) as http:
            for path in ("/v1/chat/completions", "/v1/completions", "/api/chat", "/api/generate"):
                wrong = await http.get(path)
                assert wrong.status_code == 405 and wrong.headers["allow"] == "OPTIONS, POST"
                body = wrong.json()
                message = body["error"] if path.startswith("/api/") else body["error"]["message"]
                assert f"Method GET is not allowed on {path}" in message
                options = await http.options(path)
                assert options.status_code == 200 and options.headers["allow"] == "OPTIONS, POST"
            origin = "http://127.0.0.1:3000"
            preflight = await http.options(
                "/v1/chat/completions",
                headers={"Origin": origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"},
            )
            assert preflight.status_code == 204
            assert preflight.headers["access-control-allow-origin"] == origin
            assert preflight.headers["access-control-allow-headers"] == "authorization"
            # A browser's own request carries CORS headers on its answer, streamed or not.
            for stream in (False, True):
                answer = await http.post("/v1/chat/completions", content=chat_body(stream=stream), headers={"Origin": origin})
                assert answer.status_code == 200
                assert answer.headers["access-control-allow-origin"] == origin
                assert "X-Request-Id" in answer.headers["access-control-expose-headers"]
                assert answer.headers["vary"] == "Origin"
            refused = await http.options("/v1/chat/completions", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
            assert refused.status_code == 403
        running.shutdown.set()


async def test_a_chunked_body_past_the_limit_is_413_before_it_ends() -> None:
    settings = make_settings(**{"provider.max_body_bytes": 4096})
    async with trio.open_nursery() as nursery:
        running = await start_server(nursery, settings, agents=("echo",))
        host, port = running.provider_url.removeprefix("http://").rsplit(":", 1)
        stream = await trio.open_tcp_stream(host, int(port))
        head = (
            f"POST /api/chat HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {API_KEY}\r\n"
            "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        piece = b"x" * 1000
        await stream.send_all(head.encode())
        answer = b""
        with trio.fail_after(10):
            for _ in range(10):  # no Content-Length: the limit is found while reading
                await stream.send_all(b"%x\r\n%s\r\n" % (len(piece), piece))
            while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
                data = await stream.receive_some(65536)
                if not data:
                    break
                answer += data
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        assert b"connection: close" in answer.lower()
        assert json.loads(answer.split(b"\r\n\r\n", 1)[1]) == {"error": "The request body is larger than 4096 bytes."}
        await stream.aclose()
        await wait_until(lambda: not running.provider.scopes and running.provider.gate.sessions.active_requests == 0)
        running.shutdown.set()


async def test_a_connection_serves_on_after_a_refusal_that_left_the_body_unread() -> None:
    async with trio.open_nursery() as nursery:
        running = await start_server(nursery, make_settings(), agents=("echo",))
        async with httpx.AsyncClient(base_url=running.provider_url, limits=httpx.Limits(max_connections=1)) as http:
            body = chat_body("unread " * 2000, stream=False)  # refused before its body is read
            for _ in range(3):
                refused = await http.post("/v1/chat/completions", content=body, headers={"Authorization": "Bearer wrong-key-0123456789"})
                assert refused.status_code == 401
                served = await http.post("/v1/chat/completions", content=chat_body("next", stream=False), headers=_headers())
                assert served.status_code == 200
                assert served.json()["choices"][0]["message"]["content"].startswith("next")
        running.shutdown.set()


async def test_a_client_that_leaves_halfway_through_its_body_holds_nothing() -> None:
    async with trio.open_nursery() as nursery:
        running = await start_server(nursery, make_settings(), agents=("echo",))
        provider = running.provider
        host, port = running.provider_url.removeprefix("http://").rsplit(":", 1)
        for _ in range(5):
            stream = await trio.open_tcp_stream(host, int(port))
            head = (
                f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {API_KEY}\r\n"
                "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"model\": \"echo\""
            )
            await stream.send_all(head.encode())
            await trio.sleep(0.05)
            await stream.aclose()
        await wait_until(lambda: not provider.scopes and provider.gate.sessions.active_requests == 0)
        assert provider.gate.limiter.open_reservations == 0
        async with httpx.AsyncClient(base_url=running.provider_url, headers=_headers()) as http:
            answer = await http.post("/v1/chat/completions", content=chat_body(stream=False))
            assert answer.status_code == 200
        running.shutdown.set()
