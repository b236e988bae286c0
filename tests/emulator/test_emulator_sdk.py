"""The official ``pangea-sdk`` drives every emulated endpoint, success and error paths, and parses every answer."""

from __future__ import annotations

import base64
import functools
import time
from collections.abc import Callable
from typing import Any

import httpx
import pangea.exceptions as pe
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from pangea.services import AuthN
from pangea.services.authn import models as m

from tests.conftest import RunningEmulator, http_post
from tests.emulator.conftest import log_in, sdk_for

pytestmark = pytest.mark.timeout(60)

UNKNOWN_USER_TOKEN = "ptu_" + "a" * 32
UNKNOWN_SESSION_ID = "pmt_" + "a" * 32


def refused(call: Callable[[], Any]) -> pe.PangeaAPIException:
    """The SDK's exception for a call that Pangea refuses."""
    with pytest.raises(pe.PangeaAPIException) as caught:
        call()
    return caught.value


def assert_token_answer(exc: pe.PangeaAPIException, status: str) -> None:
    """InvalidToken / ExpiredToken exactly as the guide shows them: HTTP 400, its summary, result null."""
    summaries = {"InvalidToken": "The token does not exist", "ExpiredToken": "The token is no longer valid"}
    assert exc.response.status == status
    assert exc.response.summary == summaries[status]
    assert exc.response.result is None
    assert exc.response.http_status == 400


def test_full_session_lifecycle(emu: RunningEmulator, sdk: AuthN) -> None:
    # Given a login code from the hosted login page
    code = emu.admin.login("ada@example.com")

    # When the app exchanges it, checks the active token and refreshes the session
    creds = sdk.client.userinfo(code).result
    assert creds is not None and creds.active_token is not None
    check = sdk.client.token_endpoints.check(creds.active_token.token)
    refreshed = sdk.client.session.refresh(creds.refresh_token.token, user_token=creds.active_token.token).result
    assert refreshed is not None and refreshed.active_token is not None

    # Then the tokens have Pangea's shapes and the check describes the active token
    assert creds.active_token.token.startswith("ptu_") and creds.refresh_token.token.startswith("ptr_")
    assert (creds.active_token.type, creds.refresh_token.type) == ("user", "session")
    assert creds.active_token.identity.startswith("pui_") and creds.active_token.email == "ada@example.com"
    assert check.status == "Success" and check.summary == "Token validated" and check.result is not None
    assert check.result.id == creds.active_token.id and check.result.type == "user"
    assert 3590 < check.result.life <= 3600

    # And the refresh rotated both secrets while the session (the refresh token's id) kept its id
    assert refreshed.refresh_token.token != creds.refresh_token.token
    assert refreshed.active_token.token != creds.active_token.token
    assert refreshed.refresh_token.id == creds.refresh_token.id

    # When the spent code and the spent refresh token are used again, Pangea no longer knows them
    assert_token_answer(refused(lambda: sdk.client.userinfo(code)), "InvalidToken")
    assert_token_answer(refused(lambda: sdk.client.session.refresh(creds.refresh_token.token)), "InvalidToken")

    # When the user logs out, then the session's tokens are unknown
    logout = sdk.client.session.logout(refreshed.active_token.token)
    assert logout.summary == "Logged out the current user login session" and logout.result is not None
    for token in (refreshed.active_token.token, creds.active_token.token, refreshed.refresh_token.token):
        assert_token_answer(refused(functools.partial(sdk.client.token_endpoints.check, token)), "InvalidToken")
    assert_token_answer(refused(lambda: sdk.client.session.logout(refreshed.active_token.token)), "InvalidToken")


def test_previous_active_token_lives_on_after_a_refresh(emu: RunningEmulator, sdk: AuthN) -> None:
    # Given a session refreshed once (as if the refresh answer had been lost)
    first = log_in(emu, sdk, "lost@example.com")
    second = sdk.client.session.refresh(first.refresh_token.token).result

    # Then the previous active token still checks valid until its own expiry
    assert sdk.client.token_endpoints.check(first.active_token.token).result.id == first.active_token.id

    # But only the current active token finds the session in a list
    by_old = sdk.session.list(filter={"active_token_id": first.active_token.id}).result
    by_new = sdk.session.list(filter={"active_token_id": second.active_token.id}).result
    assert by_old.sessions == [] and by_old.count == 0
    assert [s.id for s in by_new.sessions] == [first.refresh_token.id]
    assert by_new.sessions[0].active_token.id == second.active_token.id


def test_client_token_serves_the_client_endpoints(emu: RunningEmulator, public_sdk: AuthN) -> None:
    # Given a session obtained with the public client token
    creds = log_in(emu, public_sdk, "pub@example.com")

    # Then every /v2/client/* endpoint answers it
    assert public_sdk.client.token_endpoints.check(creds.active_token.token).status == "Success"
    refreshed = public_sdk.client.session.refresh(creds.refresh_token.token).result
    listed = public_sdk.client.session.list(token=refreshed.active_token.token).result
    assert [s.id for s in listed.sessions] == [creds.refresh_token.id] and listed.last == ""
    assert public_sdk.client.jwks().result.keys
    assert public_sdk.client.session.logout(refreshed.active_token.token).status == "Success"


def test_client_token_is_refused_on_service_endpoints(emu: RunningEmulator, public_sdk: AuthN) -> None:
    calls: list[Callable[[], Any]] = [
        lambda: public_sdk.session.list(),
        lambda: public_sdk.session.logout("pui_" + "a" * 32),
        lambda: public_sdk.session.invalidate(UNKNOWN_SESSION_ID),
    ]
    for call in calls:
        with pytest.raises(pe.UnauthorizedException) as caught:
            call()
        assert caught.value.response.http_status == 401
        assert caught.value.response.summary == "Not authorized to access this resource"


@pytest.mark.parametrize("token", ["pts_" + "z" * 32, "pcl_" + "z" * 32, "not-a-token"])
def test_wrong_bearer_token_is_unauthorized(emu: RunningEmulator, token: str) -> None:
    wrong = sdk_for(emu, token)
    with pytest.raises(pe.UnauthorizedException) as caught:
        wrong.client.token_endpoints.check(UNKNOWN_USER_TOKEN)
    assert caught.value.response.http_status == 401 and caught.value.response.result is None
    assert emu.admin.stats()["requests"]["/v2/client/token/check"] == {"401": 1}


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Basic Zm9vOmJhcg=="}, {"Authorization": "Bearer"}])
def test_missing_or_malformed_authorization_is_unauthorized(emu: RunningEmulator, headers: dict[str, str]) -> None:
    response = httpx.post(f"{emu.base_url}/v2/client/jwks", json={}, headers=headers)
    assert response.status_code == 401 and response.json()["status"] == "Unauthorized"


def test_service_and_client_tokens_check_as_themselves(emu: RunningEmulator, sdk: AuthN) -> None:
    service = sdk.client.token_endpoints.check(emu.service_token).result
    client = sdk.client.token_endpoints.check(emu.client_token).result
    assert (service.type, client.type) == ("service", "client")
    assert service.id.startswith("pmt_") and service.email == "" and service.life > 86400


def test_expired_tokens(emu: RunningEmulator, sdk: AuthN) -> None:
    # Given a session whose tokens live one second, and a long-lived one
    short = log_in(emu, sdk, "short@example.com", active_ttl=1, refresh_ttl=1)
    long = log_in(emu, sdk, "long@example.com", active_ttl=1, refresh_ttl=60)
    assert short.active_token.life == 1

    # When the second has passed
    time.sleep(1.2)

    # Then both tokens of the short session answer ExpiredToken, and the session is gone from lists
    assert_token_answer(refused(lambda: sdk.client.token_endpoints.check(short.active_token.token)), "ExpiredToken")
    assert_token_answer(refused(lambda: sdk.client.session.refresh(short.refresh_token.token)), "ExpiredToken")
    assert_token_answer(refused(lambda: sdk.client.session.logout(short.active_token.token)), "ExpiredToken")
    assert_token_answer(refused(lambda: sdk.session.invalidate(short.refresh_token.id)), "ExpiredToken")
    assert [s.email for s in sdk.session.list().result.sessions] == ["long@example.com"]

    # And an expired active token does not stop its live refresh token
    assert_token_answer(refused(lambda: sdk.client.token_endpoints.check(long.active_token.token)), "ExpiredToken")
    renewed = sdk.client.session.refresh(long.refresh_token.token, user_token=long.active_token.token).result
    assert sdk.client.token_endpoints.check(renewed.active_token.token).status == "Success"


def test_an_active_token_never_outlives_its_session(emu: RunningEmulator, sdk: AuthN) -> None:
    creds = log_in(emu, sdk, "capped@example.com", active_ttl=3600, refresh_ttl=60)
    assert creds.active_token.expire == creds.refresh_token.expire and creds.active_token.life <= 60


def test_unknown_tokens_are_invalid(emu: RunningEmulator, sdk: AuthN) -> None:
    jwt_shaped = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln"
    for token in (UNKNOWN_USER_TOKEN, "ptr_" + "b" * 32, "pti_" + "c" * 32, jwt_shaped):
        assert_token_answer(refused(functools.partial(sdk.client.token_endpoints.check, token)), "InvalidToken")
    assert_token_answer(refused(lambda: sdk.client.session.refresh("ptr_" + "b" * 32)), "InvalidToken")
    assert_token_answer(refused(lambda: sdk.client.userinfo("pmc_" + "d" * 32)), "InvalidToken")
    assert_token_answer(refused(lambda: sdk.session.invalidate(UNKNOWN_SESSION_ID)), "InvalidToken")


def test_refresh_with_another_sessions_user_token_is_refused(emu: RunningEmulator, sdk: AuthN) -> None:
    mine = log_in(emu, sdk, "me@example.com")
    theirs = log_in(emu, sdk, "them@example.com")
    exc = refused(lambda: sdk.client.session.refresh(mine.refresh_token.token, user_token=theirs.active_token.token))
    assert_token_answer(exc, "InvalidToken")
    # the refused call spent nothing
    assert sdk.client.session.refresh(mine.refresh_token.token).status == "Success"


def test_session_list_filters(emu: RunningEmulator, sdk: AuthN) -> None:
    # Given two sessions of Ann (one with a profile) and one of Bob
    ann1 = log_in(emu, sdk, "ann@example.com", profile={"first_name": "Ann"})
    ann2 = log_in(emu, sdk, "ann@example.com")
    bob = log_in(emu, sdk, "bob@example.org")
    ann, bob_id = ann1.active_token.identity, bob.active_token.identity
    ids = {c.refresh_token.id: c for c in (ann1, ann2, bob)}

    def found(**flt: Any) -> set[str]:
        result = sdk.session.list(filter=flt).result
        assert result.count == len(result.sessions)
        return {s.id for s in result.sessions}

    # Then each filter selects exactly its sessions
    assert found() == set(ids)
    assert found(active_token_id=ann2.active_token.id) == {ann2.refresh_token.id}
    assert found(active_token_id__in=[ann1.active_token.id, bob.active_token.id, "pmt_x"]) == {
        ann1.refresh_token.id,
        bob.refresh_token.id,
    }
    assert found(id=bob.refresh_token.id) == {bob.refresh_token.id}
    assert found(id__in=[ann1.refresh_token.id, UNKNOWN_SESSION_ID]) == {ann1.refresh_token.id}
    assert found(identity=ann) == {ann1.refresh_token.id, ann2.refresh_token.id}
    assert found(identity__in=[bob_id, "pui_nobody"]) == {bob.refresh_token.id}
    assert found(email="bob@example.org") == {bob.refresh_token.id}
    assert found(email__in=["ann@example.com"]) == {ann1.refresh_token.id, ann2.refresh_token.id}
    assert found(email__contains=["ann", ".com"]) == {ann1.refresh_token.id, ann2.refresh_token.id}
    assert found(type="session") == set(ids) and found(type="user") == set()
    assert found(created_at__gte=ann2.refresh_token.created_at) == {ann2.refresh_token.id, bob.refresh_token.id}
    assert found(created_at__lt=ann2.refresh_token.created_at) == {ann1.refresh_token.id}
    assert found(expire__gt="2000-01-01T00:00:00Z") == set(ids)
    assert found(identity=ann, email="bob@example.org") == set()

    # And profile filters reach the profile (sent raw: the SDK's filter model lacks them)
    def found_raw(flt: dict[str, Any]) -> set[str]:
        body = http_post(emu.base_url, "/v2/session/list", emu.service_token, {"filter": flt}).json()
        return {s["id"] for s in body["result"]["sessions"]}

    assert found_raw({"profile_first_name": "Ann"}) == {ann1.refresh_token.id}
    assert found_raw({"profile_first_name__exists": False}) == {ann2.refresh_token.id, bob.refresh_token.id}
    assert found_raw({"profile_first_name__contains": ["nn", "zz"]}) == {ann1.refresh_token.id}


def test_session_list_pages_with_an_opaque_cursor(emu: RunningEmulator, sdk: AuthN) -> None:
    # Given five sessions
    emails = [f"user{i}@example.com" for i in range(5)]
    for email in emails:
        log_in(emu, sdk, email)

    def walk(**options: Any) -> list[str]:
        seen: list[str] = []
        last = None
        while True:
            page = sdk.session.list(size=2, last=last, **options).result
            assert page.count == 5 and len(page.sessions) <= 2
            seen += [s.email for s in page.sessions]
            if page.last == "":
                return seen
            last = page.last

    # Then pages of two walk through all of them, in order, each once
    assert walk(order_by=m.SessionListOrderBy.EMAIL) == emails
    assert walk(order_by=m.SessionListOrderBy.EMAIL, order=m.ItemOrder.DESC) == emails[::-1]
    assert walk() == emails  # created_at ascending by default
    assert walk(order_by=m.SessionListOrderBy.CREATED_AT, order=m.ItemOrder.DESC) == emails[::-1]
    assert sorted(walk(order_by=m.SessionListOrderBy.ID)) == emails


def test_cursor_neither_skips_nor_repeats_when_sessions_end(emu: RunningEmulator, sdk: AuthN) -> None:
    # Given four sessions and the first page of two
    creds = [log_in(emu, sdk, f"u{i}@example.com") for i in range(4)]
    first = sdk.session.list(size=2, order_by=m.SessionListOrderBy.EMAIL).result

    # When a session on the first page ends before the next page is read
    sdk.session.invalidate(creds[0].refresh_token.id)
    second = sdk.session.list(size=2, order_by=m.SessionListOrderBy.EMAIL, last=first.last).result

    # Then the second page holds exactly the remaining two
    assert [s.email for s in first.sessions] == ["u0@example.com", "u1@example.com"]
    assert [s.email for s in second.sessions] == ["u2@example.com", "u3@example.com"]
    assert second.last == "" and second.count == 3


@pytest.mark.parametrize("last", ["not a cursor", "bm9wZQ", base64.urlsafe_b64encode(b'[1,"x"]').decode()])
def test_a_foreign_cursor_is_a_validation_error(emu: RunningEmulator, sdk: AuthN, last: str) -> None:
    log_in(emu, sdk, "x@example.com")
    with pytest.raises(pe.ValidationException) as caught:
        sdk.session.list(last=last, order_by=m.SessionListOrderBy.EMAIL)
    assert [(e.code, e.source) for e in caught.value.errors] == [("BadFormat", "/last")]


def test_session_logout_ends_every_session_of_one_user(emu: RunningEmulator, sdk: AuthN) -> None:
    # Given Ann with two sessions and Bob with one
    ann = [log_in(emu, sdk, "ann@example.com") for _ in range(2)]
    bob = log_in(emu, sdk, "bob@example.com")
    assert ann[0].active_token.identity == ann[1].active_token.identity != bob.active_token.identity

    # When Ann is logged out everywhere (twice: it is idempotent)
    for _ in range(2):
        answer = sdk.session.logout(ann[0].active_token.identity)
        assert answer.status == "Success" and answer.result is not None

    # Then Ann's tokens are unknown, Bob's are fine, and so is a user who never logged in
    for creds in ann:
        assert_token_answer(
            refused(functools.partial(sdk.client.session.refresh, creds.refresh_token.token)), "InvalidToken"
        )
    assert sdk.client.token_endpoints.check(bob.active_token.token).status == "Success"
    assert [s.id for s in sdk.session.list().result.sessions] == [bob.refresh_token.id]
    assert sdk.session.logout("pui_" + "n" * 32).status == "Success"


def test_session_invalidate_ends_one_session(emu: RunningEmulator, sdk: AuthN) -> None:
    keep, end = log_in(emu, sdk, "ann@example.com"), log_in(emu, sdk, "ann@example.com")

    assert sdk.session.invalidate(end.refresh_token.id).status == "Success"

    assert_token_answer(refused(lambda: sdk.client.token_endpoints.check(end.active_token.token)), "InvalidToken")
    assert_token_answer(refused(lambda: sdk.client.session.refresh(end.refresh_token.token)), "InvalidToken")
    assert_token_answer(refused(lambda: sdk.session.invalidate(end.refresh_token.id)), "InvalidToken")
    assert sdk.client.token_endpoints.check(keep.active_token.token).status == "Success"


def test_client_session_list_and_invalidate_stay_within_one_user(emu: RunningEmulator, public_sdk: AuthN) -> None:
    # Given Ann on two devices and Bob on one
    phone, laptop = log_in(emu, public_sdk, "ann@example.com"), log_in(emu, public_sdk, "ann@example.com")
    bob = log_in(emu, public_sdk, "bob@example.com")

    # Then Ann sees her two sessions only, page by page
    mine = public_sdk.client.session.list(token=phone.active_token.token, size=1).result
    rest = public_sdk.client.session.list(token=phone.active_token.token, size=1, last=mine.last).result
    assert {s.id for s in mine.sessions + rest.sessions} == {phone.refresh_token.id, laptop.refresh_token.id}
    assert rest.last == "" and not hasattr(rest, "count")

    # And she cannot end Bob's session, but can end her laptop's
    exc = refused(lambda: public_sdk.client.session.invalidate(phone.active_token.token, bob.refresh_token.id))
    assert_token_answer(exc, "InvalidToken")
    assert public_sdk.client.session.invalidate(phone.active_token.token, laptop.refresh_token.id).status == "Success"
    assert_token_answer(
        refused(lambda: public_sdk.client.token_endpoints.check(laptop.active_token.token)), "InvalidToken"
    )
    assert public_sdk.client.token_endpoints.check(bob.active_token.token).status == "Success"
    assert_token_answer(
        refused(lambda: public_sdk.client.session.list(token=laptop.active_token.token)), "InvalidToken"
    )


def test_jwks_holds_a_usable_p256_key(sdk: AuthN) -> None:
    keys = sdk.client.jwks().result.keys
    assert len(keys) == 1
    key = keys[0]
    assert (key.kty, key.alg, key.crv) == ("EC", "ES256", "P-256") and key.kid.startswith("pvi_")

    def number(text: str) -> int:
        return int.from_bytes(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)), "big")

    # the point is on the curve: cryptography refuses it otherwise
    ec.EllipticCurvePublicNumbers(number(key.x), number(key.y), ec.SECP256R1()).public_key()


def test_validation_errors_name_the_field(emu: RunningEmulator, sdk: AuthN) -> None:
    with pytest.raises(pe.ValidationException) as bad_id:
        sdk.session.invalidate("not-a-session-id")
    with pytest.raises(pe.ValidationException) as bad_size:
        sdk.session.list(size=0)
    with pytest.raises(pe.ValidationException) as bad_code:
        sdk.client.userinfo("pmc_short")

    assert [(e.code, e.source) for e in bad_id.value.errors] == [("DoesNotMatchPattern", "/session_id")]
    assert [(e.code, e.source) for e in bad_size.value.errors] == [("IsTooSmall", "/size")]
    assert [(e.code, e.source) for e in bad_code.value.errors] == [("DoesNotMatchPattern", "/code")]
    assert bad_id.value.response.http_status == 400


def test_unknown_path_is_not_found(emu: RunningEmulator) -> None:
    for path in ("/v2/user/create", "/v1/session/list", "/"):
        response = http_post(emu.base_url, path, emu.service_token, {})
        assert response.status_code == 404 and response.json()["status"] == "NotFound"
