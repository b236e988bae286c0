"""Behind an egress proxy: every request to Pangea goes through ``HTTP(S)_PROXY`` unless ``NO_PROXY`` says not.

The proxy is a real process (``tests.forward_proxy``); the emulator counts what reached it. The
variables are the process environment's, as an operator sets them, read by httpx's own helpers.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import RunningEmulator
from tests.forward_proxy import RunningProxy, running_proxy
from worker import authn, checks, transport, wire

PROXY_VARIABLES = (
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "NO_PROXY",
    "http_proxy",
    "https_proxy",
    "all_proxy",
    "no_proxy",
)


@pytest.fixture
def proxy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[RunningProxy]:
    """A forward proxy process, with no proxy variable of the machine's leaking into the test."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    with running_proxy(tmp_path) as running:
        yield running


async def check_three_tokens(emu: RunningEmulator) -> None:
    async with authn.AuthnClient(base_url=emu.base_url, token=emu.service_token, retries=0) as client:
        for _ in range(3):
            assert (await client.check_token(checks.PROBE_TOKEN)).verdict is wire.Verdict.INVALID


async def test_every_request_goes_through_http_proxy(
    emu: RunningEmulator, proxy: RunningProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given an operator who set HTTP_PROXY (the emulator is plain http://)
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    # When the AuthN client checks three tokens
    await check_three_tokens(emu)
    # Then the proxy forwarded all three, and they reached Pangea
    forwarded = [line for line in proxy.requests() if line.endswith("/v2/client/token/check")]
    assert forwarded == [f"POST {emu.base_url}/v2/client/token/check"] * 3
    assert emu.admin.stats()["requests"]["/v2/client/token/check"] == {"400": 3}  # InvalidToken is a 400 answer


async def test_no_proxy_sends_requests_straight(
    emu: RunningEmulator, proxy: RunningProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a proxy for everything, except the emulator's host in NO_PROXY
    monkeypatch.setenv("ALL_PROXY", proxy.url)
    monkeypatch.setenv("NO_PROXY", "localhost,127.0.0.1")
    # When the client talks to Pangea
    await check_three_tokens(emu)
    # Then nothing went through the proxy, and Pangea still answered
    assert proxy.requests() == []
    assert emu.admin.stats()["requests"]["/v2/client/token/check"] == {"400": 3}  # InvalidToken is a 400 answer


async def test_a_dead_proxy_is_an_unreachable_pangea_not_a_revocation(
    emu: RunningEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given HTTP_PROXY names a port nobody listens on
    from tests.conftest import free_port

    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{free_port()}")
    # Then the client reports Pangea unreachable (never an answer about the token), and nothing reached Pangea
    from worker import errors

    with pytest.raises(errors.AuthnUnavailable):
        await check_three_tokens(emu)
    assert "/v2/client/token/check" not in emu.admin.stats()["requests"]


def test_routes_are_matched_once_per_origin(monkeypatch: pytest.MonkeyPatch) -> None:
    # Given proxies for https and an exception for one host, as httpx reads them
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.internal:3128")
    monkeypatch.setenv("NO_PROXY", ".corp.example")
    pooled = transport.PooledTransport(max_connections=4)
    # Then each URL gets the proxy a plain httpx client would use
    import httpx

    assert pooled.proxy_for(httpx.URL("https://authn.aws.us.pangea.cloud/v2/x")) == "http://proxy.internal:3128"
    assert pooled.proxy_for(httpx.URL("https://authn.corp.example/v2/x")) is None
    assert pooled.proxy_for(httpx.URL("http://authn.aws.us.pangea.cloud/v2/x")) is None
    # And trust_env=False ignores the environment altogether
    assert (
        transport.PooledTransport(max_connections=4, trust_env=False).proxy_for(
            httpx.URL("https://authn.aws.us.pangea.cloud/")
        )
        is None
    )
