"""Our AuthnClient against the emulator, over real HTTP on loopback, success and every failure class."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from tests.conftest import RunningEmulator, free_port
from worker import authn, errors, wire

pytestmark = pytest.mark.timeout(60)


def client_for(emu: RunningEmulator, **options: Any) -> authn.AuthnClient:
    defaults: dict[str, Any] = {"base_url": emu.base_url, "token": emu.service_token, "backoff": 0.01}
    return authn.AuthnClient(**(defaults | options))


@pytest.fixture
async def client(emu: RunningEmulator) -> AsyncIterator[authn.AuthnClient]:
    async with client_for(emu) as c:
        yield c


async def login(client: authn.AuthnClient, emu: RunningEmulator, email: str, **ttl: Any) -> wire.SessionCreds:
    code = await asyncio.to_thread(emu.admin.login, email, **ttl)
    return await client.userinfo(code)


def requests_to(emu: RunningEmulator, path: str) -> int:
    return sum(emu.admin.stats()["requests"].get(path, {}).values())


async def test_full_session_lifecycle(client: authn.AuthnClient, emu: RunningEmulator) -> None:
    # Given a user who just logged in
    creds = await login(client, emu, "ada@example.com")
    assert creds.active_token.token and creds.active_token.token.startswith("ptu_")
    assert creds.refresh_token.token and creds.refresh_token.token.startswith("ptr_")

    # When the worker checks and refreshes the session
    check = await client.check_token(creds.active_token.token)
    refreshed = await client.refresh(creds.refresh_token.token, user_token=creds.active_token.token)
    reused = await client.refresh(creds.refresh_token.token)

    # Then the check is valid, the refresh rotates both tokens, and the spent refresh token is refused
    assert check.verdict is wire.Verdict.VALID and check.info is not None
    assert check.info.identity == creds.active_token.identity and check.info.email == "ada@example.com"
    assert check.request_id.startswith("prq_")
    assert refreshed.verdict is wire.Verdict.VALID and refreshed.creds is not None
    assert refreshed.creds.active_token.token != creds.active_token.token
    assert refreshed.creds.refresh_token.token != creds.refresh_token.token
    assert reused.verdict is wire.Verdict.INVALID and reused.creds is None

    # When the user logs out, then Pangea no longer knows the token, and a second logout says so
    new_token = refreshed.creds.active_token.token
    assert new_token is not None
    assert (await client.client_logout(new_token)).verdict is wire.Verdict.VALID
    assert (await client.check_token(new_token)).verdict is wire.Verdict.INVALID
    assert (await client.client_logout(new_token)).verdict is wire.Verdict.INVALID


async def test_expired_token_is_an_answer(client: authn.AuthnClient, emu: RunningEmulator) -> None:
    creds = await login(client, emu, "short@example.com", active_ttl=1, refresh_ttl=1)
    assert creds.active_token.token and creds.refresh_token.token
    await asyncio.sleep(1.3)
    assert (await client.check_token(creds.active_token.token)).verdict is wire.Verdict.EXPIRED
    assert (await client.refresh(creds.refresh_token.token)).verdict is wire.Verdict.EXPIRED


async def test_unknown_token_is_invalid(client: authn.AuthnClient) -> None:
    check = await client.check_token("ptu_" + "a" * 32)
    assert check.verdict is wire.Verdict.INVALID and check.info is None


async def test_bulk_lookup_by_active_token_ids_pages_through(client: authn.AuthnClient, emu: RunningEmulator) -> None:
    # Given five live sessions and one that was invalidated at Pangea
    all_creds = [await login(client, emu, f"user{i}@example.com") for i in range(6)]
    await client.session_invalidate(all_creds[5].session_id)
    ids = [c.active_token.id for c in all_creds]

    # When we ask in bulk, one page of two at a time
    found: dict[str, wire.SessionItem] = {}
    last = None
    while True:
        page = await client.session_list(filter={"active_token_id__in": ids}, size=2, last=last)
        assert page.count is not None
        found.update({s.active_token.id: s for s in page.sessions if s.active_token})
        if not page.last:
            break
        last = page.last

    # Then every live session is found and the invalidated one is not, with or without the helper
    assert set(found) == set(ids[:5])
    listed = await client.sessions_by_active_token_ids(ids)
    assert set(listed.found) == set(ids[:5]) and listed.unlisted == []
    assert found[ids[0]].id == all_creds[0].session_id


async def test_user_wide_logout_and_client_session_endpoints(client: authn.AuthnClient, emu: RunningEmulator) -> None:
    # Given a user with two sessions and another user with one
    a1 = await login(client, emu, "ann@example.com")
    a2 = await login(client, emu, "ann@example.com")
    b1 = await login(client, emu, "bob@example.com")
    assert a1.active_token.token and a2.active_token.token and b1.active_token.token
    assert a1.active_token.identity == a2.active_token.identity

    # The user sees both sessions, and can end one of them
    mine = await client.client_session_list(a1.active_token.token)
    assert {s.id for s in mine.sessions} == {a1.session_id, a2.session_id}
    ended = await client.client_session_invalidate(a1.active_token.token, a2.session_id)
    assert ended.verdict is wire.Verdict.VALID
    assert (await client.check_token(a2.active_token.token)).verdict is wire.Verdict.INVALID

    # A user-wide logout ends every session of that user only
    assert (await client.session_logout(a1.active_token.identity)).verdict is wire.Verdict.VALID
    assert (await client.check_token(a1.active_token.token)).verdict is wire.Verdict.INVALID
    assert (await client.check_token(b1.active_token.token)).verdict is wire.Verdict.VALID
    assert (await client.session_logout(a1.active_token.identity)).verdict is wire.Verdict.VALID  # idempotent


async def test_jwks(client: authn.AuthnClient) -> None:
    keys = await client.jwks()
    assert keys and all("kty" in k and "alg" in k for k in keys)


async def test_wrong_service_token_is_rejected_us(emu: RunningEmulator) -> None:
    async with client_for(emu, token="pts_" + "z" * 32) as wrong:
        with pytest.raises(errors.AuthnRejectedUs):
            await wrong.check_token("ptu_" + "a" * 32)
    assert requests_to(emu, "/v2/client/token/check") == 1  # never retried


async def test_client_token_cannot_use_service_endpoints(emu: RunningEmulator) -> None:
    async with client_for(emu, token=emu.client_token) as public:
        assert (await public.check_token("ptu_" + "a" * 32)).verdict is wire.Verdict.INVALID
        with pytest.raises(errors.AuthnRejectedUs):
            await public.session_list(size=1)


async def test_validation_error_is_a_rejected_request(client: authn.AuthnClient) -> None:
    with pytest.raises(errors.AuthnRequestInvalid) as caught:
        await client.session_invalidate("not-a-session-id")
    assert caught.value.status == "ValidationError" and caught.value.sources == ("/session_id",)


async def test_lists_are_split_below_pangeas_limits(client: authn.AuthnClient, emu: RunningEmulator) -> None:
    # Given seven live sessions, and a Pangea that refuses lists above 3 results or 2 filter ids
    ids = [(await login(client, emu, f"split{i}@example.com")).active_token.id for i in range(7)]
    emu.admin.faults(max_size=3, max_filter_ids=2)

    # When one page of all seven is asked for, Pangea refuses it and names what broke its limits
    with pytest.raises(errors.AuthnRequestInvalid) as caught:
        await client.session_list(filter={"active_token_id__in": ids}, size=7)
    assert set(caught.value.sources) == {"/size", "/filter/active_token_id__in"}

    # Then the bulk lookup still finds every one, in requests Pangea accepts
    listed = await client.sessions_by_active_token_ids(ids)
    assert set(listed.found) == set(ids) and listed.unlisted == []
    assert client._limits.ids.known == 2

    # When a list is refused however small, the ids come back for one check each
    emu.admin.faults(error="ValidationError", paths=["/v2/session/list"])
    listed = await client.sessions_by_active_token_ids(ids[:3])
    assert listed.found == {} and listed.unlisted == ids[:3]


# --- the envelope decides, not the HTTP code -------------------------------------------------------


@pytest.mark.parametrize("code", [400, 401, 403, 404])
async def test_token_verdicts_are_verdicts_under_any_4xx_code(
    client: authn.AuthnClient, emu: RunningEmulator, code: int
) -> None:
    # Given a Pangea answering verdicts with HTTP `code`, a refreshed session and one about to lapse
    emu.admin.faults(http_codes={"InvalidToken": code, "ExpiredToken": code})
    creds = await login(client, emu, "coded@example.com")
    lapsing = await login(client, emu, "lapsing@example.com", active_ttl=1)
    assert creds.refresh_token.token and lapsing.active_token.token
    fresh = await client.refresh(creds.refresh_token.token)
    assert fresh.creds is not None and fresh.creds.active_token.token

    # When tokens are checked, refreshed and logged out
    spent = await client.refresh(creds.refresh_token.token)
    ended = await client.client_logout(fresh.creds.active_token.token)
    again = await client.client_logout(fresh.creds.active_token.token)
    unknown = await client.check_token("ptu_" + "a" * 32)
    await asyncio.sleep(1.1)
    lapsed = await client.check_token(lapsing.active_token.token)

    # Then each is Pangea's verdict, read from the envelope
    assert (spent.verdict, ended.verdict, again.verdict) == (
        wire.Verdict.INVALID,
        wire.Verdict.VALID,
        wire.Verdict.INVALID,
    )
    assert (unknown.verdict, lapsed.verdict) == (wire.Verdict.INVALID, wire.Verdict.EXPIRED)
    assert emu.admin.stats()["requests"]["/v2/client/token/check"] == {str(code): 2}


@pytest.mark.parametrize("code", [400, 401, 403])
async def test_unauthorized_is_our_token_under_any_code(emu: RunningEmulator, code: int) -> None:
    emu.admin.faults(http_codes={"Unauthorized": code})
    async with client_for(emu, token="pts_" + "z" * 32) as wrong:
        with pytest.raises(errors.AuthnRejectedUs, match="Unauthorized"):
            await wrong.check_token("ptu_" + "a" * 32)
    assert requests_to(emu, "/v2/client/token/check") == 1  # never retried


async def test_success_under_another_code_is_no_answer(client: authn.AuthnClient, emu: RunningEmulator) -> None:
    # Given a live session, and something answering Pangea's Success with HTTP 201 (the Go SDK refuses it)
    creds = await login(client, emu, "twohundredone@example.com")
    emu.admin.faults(http_codes={"Success": 201})

    # When its token is checked, then the answer is a protocol error, never a verdict
    with pytest.raises(errors.AuthnProtocolError, match="Success under HTTP 201, not 200"):
        await client.check_token(creds.active_token.token or "")

    # ... and once Pangea answers 200 again, the same call gets the verdict
    emu.admin.clear_faults()
    assert (await client.check_token(creds.active_token.token or "")).verdict is wire.Verdict.VALID


async def test_a_throttle_is_a_throttle_under_any_code(emu: RunningEmulator) -> None:
    emu.admin.faults(error="TooManyRequests", retry_after=120, http_codes={"TooManyRequests": 400})
    async with client_for(emu) as c:
        with pytest.raises(errors.AuthnRateLimited) as caught:
            await c.check_token("ptu_" + "a" * 32)
    assert caught.value.retry_after == 120


async def test_a_verdict_under_a_server_error_is_no_verdict(emu: RunningEmulator) -> None:
    emu.admin.faults(http_codes={"InvalidToken": 503})
    async with client_for(emu, retries=1) as c:
        with pytest.raises(errors.AuthnUnavailable, match="HTTP 503"):
            await c.check_token("ptu_" + "a" * 32)
    assert requests_to(emu, "/v2/client/token/check") == 2  # retried, as any server error


# --- failures to get an answer -------------------------------------------------------------------


async def test_server_errors_are_retried_then_unavailable(emu: RunningEmulator) -> None:
    emu.admin.faults(error_rate=1.0, error="InternalError")
    async with client_for(emu, retries=2) as c:
        with pytest.raises(errors.AuthnUnavailable) as caught:
            await c.check_token("ptu_" + "a" * 32)
    assert type(caught.value) is errors.AuthnUnavailable
    assert caught.value.request_id and caught.value.request_id.startswith("prq_")
    assert requests_to(emu, "/v2/client/token/check") == 3


async def test_flaky_server_is_ridden_out_by_retries(emu: RunningEmulator) -> None:
    emu.admin.faults(error_rate=0.5, error="InternalError")
    async with client_for(emu, retries=12) as c:
        verdicts = [(await c.check_token("ptu_" + "a" * 32)).verdict for _ in range(10)]
    assert verdicts == [wire.Verdict.INVALID] * 10


async def test_rate_limit_honours_short_retry_after(emu: RunningEmulator) -> None:
    emu.admin.faults(error_rate=1.0, error="TooManyRequests", retry_after=1)
    async with client_for(emu, retries=1) as c:
        started = time.monotonic()
        with pytest.raises(errors.AuthnRateLimited) as caught:
            await c.check_token("ptu_" + "a" * 32)
    assert time.monotonic() - started >= 0.95  # waited Retry-After once before the second try
    assert caught.value.retry_after == 1
    assert requests_to(emu, "/v2/client/token/check") == 2


async def test_rate_limit_with_long_retry_after_is_left_to_the_caller(emu: RunningEmulator) -> None:
    emu.admin.faults(error_rate=1.0, error="TooManyRequests", retry_after=120)
    async with client_for(emu, retries=3) as c:
        with pytest.raises(errors.AuthnRateLimited) as caught:
            await c.check_token("ptu_" + "a" * 32)
    assert caught.value.retry_after == 120
    assert requests_to(emu, "/v2/client/token/check") == 1


async def test_malformed_body_is_a_protocol_error(emu: RunningEmulator) -> None:
    emu.admin.faults(error_rate=1.0, error="Malformed")
    async with client_for(emu) as c:
        with pytest.raises(errors.AuthnProtocolError):
            await c.check_token("ptu_" + "a" * 32)


@pytest.mark.parametrize(
    ("fault", "problem"),
    [
        ("NotJson", "not JSON"),
        ("WrongContentType", "labelled 'text/html', not application/json"),
        ("Huge", f"larger than {authn.MAX_RESPONSE_BYTES} bytes"),
    ],
)
async def test_what_is_not_plainly_pangeas_answer_is_a_protocol_error(
    emu: RunningEmulator, fault: str, problem: str
) -> None:
    # Given a session Pangea knows, behind a proxy that garbles, relabels or bloats answers
    async with client_for(emu) as c:
        creds = await login(c, emu, "garbled@example.com")
        emu.admin.faults(error=fault, paths=["/v2/client/token/check"])

        # When its token is checked, the answer is no verdict at all, and it says why
        with pytest.raises(errors.AuthnProtocolError, match=problem):
            await c.check_token(creds.active_token.token or "")

        # Then once the proxy behaves, the same client gets Pangea's verdict
        emu.admin.clear_faults()
        assert (await c.check_token(creds.active_token.token or "")).verdict is wire.Verdict.VALID


async def test_timeout_is_unavailable(emu: RunningEmulator) -> None:
    emu.admin.faults(error_rate=1.0, error="Timeout")
    async with client_for(emu, timeout=0.3, retries=1) as c:
        with pytest.raises(errors.AuthnUnavailable):
            await c.check_token("ptu_" + "a" * 32)


async def test_dropped_refresh_is_outcome_unknown_and_never_repeated(
    client: authn.AuthnClient, emu: RunningEmulator
) -> None:
    # Given a session, and Pangea cutting the connection after performing refreshes
    creds = await login(client, emu, "lost@example.com")
    assert creds.active_token.token and creds.refresh_token.token
    emu.admin.faults(error_rate=1.0, error="Dropped", paths=["/v2/client/session/refresh"])

    # When we refresh
    with pytest.raises(errors.AuthnOutcomeUnknown):
        await client.refresh(creds.refresh_token.token)

    # Then it was sent once only: Pangea did rotate, yet the old active token still answers valid
    assert requests_to(emu, "/v2/client/session/refresh") == 1
    emu.admin.clear_faults()
    assert (await client.refresh(creds.refresh_token.token)).verdict is wire.Verdict.INVALID
    assert (await client.check_token(creds.active_token.token)).verdict is wire.Verdict.VALID


async def test_dropped_check_is_retried(emu: RunningEmulator) -> None:
    emu.admin.faults(error_rate=1.0, error="Dropped", paths=["/v2/client/token/check"])
    async with client_for(emu, retries=2) as c:
        with pytest.raises(errors.AuthnUnavailable):
            await c.check_token("ptu_" + "a" * 32)
    assert requests_to(emu, "/v2/client/token/check") == 3


async def test_refresh_timeout_is_outcome_unknown(client: authn.AuthnClient, emu: RunningEmulator) -> None:
    creds = await login(client, emu, "slow@example.com")
    assert creds.refresh_token.token
    emu.admin.faults(error_rate=1.0, error="Timeout", paths=["/v2/client/session/refresh"])
    async with client_for(emu, timeout=0.2) as c:
        with pytest.raises(errors.AuthnOutcomeUnknown):
            await c.refresh(creds.refresh_token.token)


async def test_nobody_listening_is_unreachable() -> None:
    async with authn.AuthnClient(
        base_url=f"http://127.0.0.1:{free_port()}", token="pts_x", retries=2, backoff=0.01
    ) as c:
        with pytest.raises(errors.AuthnUnreachable):
            await c.refresh("ptr_" + "a" * 32)


async def test_no_failure_message_carries_a_token(client: authn.AuthnClient, emu: RunningEmulator) -> None:
    # Given real tokens and every failure class
    creds = await login(client, emu, "secret@example.com")
    secrets = [creds.active_token.token, creds.refresh_token.token, emu.service_token]
    caught: list[BaseException] = []
    calls: list[Callable[[authn.AuthnClient], Any]] = [
        lambda c: c.check_token(creds.active_token.token or ""),
        lambda c: c.refresh(creds.refresh_token.token or ""),
    ]
    for fault in ("InternalError", "TooManyRequests", "Malformed", "Dropped", "NotJson", "WrongContentType"):
        emu.admin.faults(error_rate=1.0, error=fault, retry_after=60)
        async with client_for(emu, retries=0) as c:
            for call in calls:
                with pytest.raises(errors.AuthnError) as info:
                    await call(c)
                caught.append(info.value)
    # Then no message, repr or pickled form names a token
    import pickle

    for exc in caught:
        text = f"{exc} {exc!r} {pickle.dumps(exc)!r}"
        assert not any(s and s in text for s in secrets), type(exc).__name__
    assert len(caught) == 12
