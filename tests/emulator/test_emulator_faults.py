"""Injected faults, stats and reset, seen from raw httpx: each fault kind behaves as documented."""

from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any

import httpx
import pytest

from tests.acceptance import harness
from tests.conftest import RunningEmulator, http_post
from worker.emulator import EmulatorAdminError, faults

pytestmark = pytest.mark.timeout(60)

CHECK = "/v2/client/token/check"
REFRESH = "/v2/client/session/refresh"
UNKNOWN = {"token": "ptu_" + "a" * 32}


def check(emu: RunningEmulator, *, timeout: float = 10) -> httpx.Response:
    """A token check of an unknown token: InvalidToken when nothing is injected."""
    return httpx.post(
        f"{emu.base_url}{CHECK}",
        json=UNKNOWN,
        headers={"Authorization": f"Bearer {emu.service_token}"},
        timeout=timeout,
    )


def log_in(emu: RunningEmulator, email: str = "ada@example.com") -> dict[str, Any]:
    code = emu.admin.login(email)
    return dict(http_post(emu.base_url, "/v2/client/userinfo", emu.service_token, {"code": code}).json()["result"])


def assert_envelope(response: httpx.Response, status: str) -> None:
    body = response.json()
    assert list(body) == ["request_id", "request_time", "response_time", "status", "summary", "result"]
    assert body["status"] == status and body["result"] is None
    assert response.headers["x-request-id"] == body["request_id"]


def test_internal_error_is_a_500_envelope_and_performs_nothing(emu: RunningEmulator) -> None:
    # Given a code to exchange, and Pangea failing every request
    code = emu.admin.login("ada@example.com")
    emu.admin.faults(error="InternalError")

    # When the code is exchanged
    response = http_post(emu.base_url, "/v2/client/userinfo", emu.service_token, {"code": code})

    # Then the answer is a 500 envelope, and the code was not spent
    assert response.status_code == 500
    assert_envelope(response, "InternalError")
    emu.admin.clear_faults()
    assert http_post(emu.base_url, "/v2/client/userinfo", emu.service_token, {"code": code}).status_code == 200


@pytest.mark.parametrize(("retry_after", "header"), [(7, "7"), (0.2, "1"), (None, "1")])
def test_too_many_requests_is_a_429_with_retry_after(
    emu: RunningEmulator, retry_after: float | None, header: str
) -> None:
    emu.admin.faults(error="TooManyRequests", **({} if retry_after is None else {"retry_after": retry_after}))

    response = check(emu)

    assert response.status_code == 429 and response.headers["retry-after"] == header
    assert_envelope(response, "TooManyRequests")


@pytest.mark.parametrize(("fault", "content_type"), [("Malformed", "text/html"), ("NotJson", "application/json")])
def test_a_200_that_is_not_an_envelope_performs_nothing(emu: RunningEmulator, fault: str, content_type: str) -> None:
    # Given a code to exchange, and a proxy answering with its own page (Malformed) or words (NotJson)
    code = emu.admin.login("ada@example.com")
    emu.admin.faults(error=fault)

    response = http_post(emu.base_url, "/v2/client/userinfo", emu.service_token, {"code": code})

    # Then the body is not JSON whatever its label, and the code was not spent
    assert response.status_code == 200 and response.headers["content-type"] == content_type
    with pytest.raises(ValueError):
        response.json()
    emu.admin.clear_faults()
    assert http_post(emu.base_url, "/v2/client/userinfo", emu.service_token, {"code": code}).status_code == 200


def test_timeout_outlasts_the_client(emu: RunningEmulator) -> None:
    emu.admin.faults(error="Timeout")

    started = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        check(emu, timeout=0.3)

    assert time.monotonic() - started >= 0.3
    assert emu.admin.stats()["requests"][CHECK] == {"504": 1}


def test_a_held_request_is_released_by_reset(emu: RunningEmulator) -> None:
    # Given a request held by a Timeout fault, from a patient client
    emu.admin.faults(error="Timeout")
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(check, emu, timeout=30)
        time.sleep(0.3)
        assert not pending.done()

        # When the emulator is reset
        started = time.monotonic()
        emu.admin.reset()
        response = pending.result(timeout=5)

    # Then the request ends at once with a gateway-timeout envelope
    assert time.monotonic() - started < 2
    assert response.status_code == 504
    assert_envelope(response, "InternalError")


def test_dropped_performs_the_request_then_cuts_the_answer(emu: RunningEmulator) -> None:
    # Given a session, and Pangea cutting the connection of refreshes after performing them
    creds = log_in(emu)
    emu.admin.faults(error="Dropped", paths=[REFRESH])

    # When the session is refreshed, the client sees a broken answer
    with pytest.raises(httpx.RemoteProtocolError):
        http_post(emu.base_url, REFRESH, emu.service_token, {"refresh_token": creds["refresh_token"]["token"]})

    # Then the refresh happened: it is counted as answered, the refresh token is spent, the active token lives
    assert emu.admin.stats()["requests"][REFRESH] == {"200": 1}
    emu.admin.clear_faults()
    again = http_post(emu.base_url, REFRESH, emu.service_token, {"refresh_token": creds["refresh_token"]["token"]})
    assert again.json()["status"] == "InvalidToken"
    still = http_post(emu.base_url, CHECK, emu.service_token, {"token": creds["active_token"]["token"]})
    assert still.json()["status"] == "Success"


def test_latency_delays_but_answers(emu: RunningEmulator) -> None:
    emu.admin.faults(latency_ms=300)

    started = time.monotonic()
    response = check(emu)

    assert time.monotonic() - started >= 0.3
    assert response.json()["status"] == "InvalidToken"


def test_error_rate_is_a_probability(emu: RunningEmulator) -> None:
    # Given half of the requests failing
    emu.admin.faults(error="InternalError", error_rate=0.5)

    # When 200 requests are made
    codes = [check(emu).status_code for _ in range(200)]

    # Then about half fail (a binomial(200, 0.5) leaves 60..140 with probability 1 - 1e-8)
    assert 60 < codes.count(500) < 140 and codes.count(400) == 200 - codes.count(500)
    assert emu.admin.stats()["requests"][CHECK] == {"500": codes.count(500), "400": codes.count(400)}


def test_paths_limit_faults_to_those_paths(emu: RunningEmulator) -> None:
    emu.admin.faults(error="InternalError", latency_ms=200, paths=[CHECK])

    started = time.monotonic()
    jwks = http_post(emu.base_url, "/v2/client/jwks", emu.service_token, {})

    assert time.monotonic() - started < 0.2 and jwks.status_code == 200
    assert check(emu).status_code == 500


def test_empty_faults_clear_them(emu: RunningEmulator) -> None:
    emu.admin.faults(error="InternalError")
    assert check(emu).status_code == 500

    emu.admin.faults()

    assert check(emu).status_code == 400
    assert httpx.get(f"{emu.base_url}/emulator/faults").json() == {
        "latency_ms": 0, "error_rate": 0.0, "error": None, "retry_after": 1.0, "paths": [], "http_codes": {},
        "max_size": None, "max_filter_ids": None,
    }  # fmt: skip


@pytest.mark.parametrize(
    ("given", "error", "error_rate"),
    [
        ({"error": "Dropped"}, "Dropped", 1.0),
        ({"error_rate": 0.25}, "InternalError", 0.25),
        ({"latency_ms": 5}, None, 0.0),
    ],
)
def test_fault_defaults(emu: RunningEmulator, given: dict[str, Any], error: str | None, error_rate: float) -> None:
    emu.admin.faults(**given)
    current = httpx.get(f"{emu.base_url}/emulator/faults").json()
    assert (current["error"], current["error_rate"]) == (error, error_rate)


def test_the_admin_surface_is_never_faulted(emu: RunningEmulator) -> None:
    emu.admin.faults(error="InternalError", latency_ms=300)

    started = time.monotonic()
    code = emu.admin.login("ada@example.com")
    stats = emu.admin.stats()

    assert code.startswith("pmc_") and stats == {"requests": {}, "in_flight": {}, "refresh_reused": 0}
    assert time.monotonic() - started < 0.3


@pytest.mark.parametrize(
    "body",
    [
        {"error": "Teapot"},
        {"error_rate": 1.5},
        {"error_rate": "half"},
        {"latency_ms": -1},
        {"latency_ms": True},
        {"retry_after": -1},
        {"paths": ["/v2/nope"]},
        {"paths": "/v2/client/token/check"},
        {"paths": ["/emulator/stats"]},
        {"surprise": 1},
        {"http_codes": {"InvalidToken": 99}},
        {"http_codes": {"InvalidToken": "401"}},
        {"http_codes": {"Teapot": 418}},
        {"http_codes": [401]},
        {"max_size": 0},
        {"max_filter_ids": "100"},
        {"max_filter_ids": True},
        [],
    ],
)
def test_bad_fault_bodies_are_refused_and_change_nothing(emu: RunningEmulator, body: Any) -> None:
    # Given a fault in force
    emu.admin.faults(error="InternalError", paths=[CHECK])

    # When a bad fault body is posted, it is refused with a reason
    response = httpx.post(f"{emu.base_url}/emulator/faults", json=body)
    assert response.status_code == 400 and response.json()["error"]
    if isinstance(body, dict):
        with pytest.raises(EmulatorAdminError):
            emu.admin.faults(**body)

    # Then the fault in force is unchanged
    assert check(emu).status_code == 500


def test_stats_count_every_api_request_by_path_and_status(emu: RunningEmulator) -> None:
    # Given answers of every kind, faulted ones included
    creds = log_in(emu)
    http_post(emu.base_url, CHECK, emu.service_token, {"token": creds["active_token"]["token"]})
    http_post(emu.base_url, CHECK, emu.service_token, {"token": 1})
    http_post(emu.base_url, CHECK, "pts_" + "z" * 32, UNKNOWN)
    http_post(emu.base_url, "/v2/user/list", emu.service_token, {})
    emu.admin.faults(error="TooManyRequests", paths=["/v2/client/jwks"])
    http_post(emu.base_url, "/v2/client/jwks", emu.service_token, {})
    check(emu)

    # Then each is counted under its path and HTTP status
    assert emu.admin.stats() == {
        "requests": {
            "/v2/client/userinfo": {"200": 1},
            CHECK: {"200": 1, "400": 2, "401": 1},
            "/v2/user/list": {"404": 1},
            "/v2/client/jwks": {"429": 1},
        },
        "in_flight": {},
        "refresh_reused": 0,
    }


def test_stats_name_the_requests_held_in_flight_until_they_are_answered(emu: RunningEmulator) -> None:
    # Given a Pangea that holds token checks for a second
    emu.admin.faults(latency_ms=1000, paths=[CHECK])

    # When two checks are sent and held
    with ThreadPoolExecutor(2) as pool:
        sent = [pool.submit(check, emu) for _ in range(2)]
        harness.wait_for(
            lambda: emu.admin.stats()["in_flight"] == {CHECK: 2}, timeout=5, what="two held checks", every=0.02
        )
        # Then, while held, they are in flight and not yet counted as answered
        assert CHECK not in emu.admin.stats()["requests"]
        codes = [f.result().status_code for f in sent]

    # ... and once answered they are counted, and nothing is in flight
    stats = emu.admin.stats()
    assert codes == [emu.verdict_code] * 2
    assert stats["in_flight"] == {} and stats["requests"][CHECK] == {str(emu.verdict_code): 2}


def test_reset_forgets_sessions_codes_counters_and_faults(emu: RunningEmulator) -> None:
    # Given a session, an unused code, counters and a fault
    creds = log_in(emu)
    code = emu.admin.login("bob@example.com")
    emu.admin.faults(error="InternalError", paths=["/v2/client/jwks"])

    # When the emulator is reset
    emu.admin.reset()

    # Then none of them is left
    assert emu.admin.stats() == {"requests": {}, "in_flight": {}, "refresh_reused": 0}
    assert http_post(emu.base_url, "/v2/client/jwks", emu.service_token, {}).status_code == 200
    token = http_post(emu.base_url, CHECK, emu.service_token, {"token": creds["active_token"]["token"]})
    userinfo = http_post(emu.base_url, "/v2/client/userinfo", emu.service_token, {"code": code})
    listed = http_post(emu.base_url, "/v2/session/list", emu.service_token, {})
    assert token.json()["status"] == userinfo.json()["status"] == "InvalidToken"
    assert listed.json()["result"]["sessions"] == [] and listed.json()["result"]["count"] == 0


def test_admin_login_gives_one_user_id_per_email(emu: RunningEmulator) -> None:
    ann1, ann2, bob = log_in(emu, "ann@example.com"), log_in(emu, "Ann@Example.com"), log_in(emu, "bob@example.com")
    assert ann1["active_token"]["identity"] == ann2["active_token"]["identity"] != bob["active_token"]["identity"]
    assert ann1["refresh_token"]["id"] != ann2["refresh_token"]["id"]
    assert math.isclose(ann1["refresh_token"]["life"], 86400, abs_tol=2)


@pytest.mark.parametrize(
    "body",
    [{}, {"email": ""}, {"email": 3}, {"email": "a@b.c", "active_ttl": 0}, {"email": "a@b.c", "refresh_ttl": "1"},
     {"email": "a@b.c", "profile": {"age": 3}}, {"email": "a@b.c", "role": "admin"}],
)  # fmt: skip
def test_admin_login_refuses_bad_bodies(emu: RunningEmulator, body: dict[str, Any]) -> None:
    response = httpx.post(f"{emu.base_url}/emulator/login", json=body)
    assert response.status_code == 400 and response.json()["error"]


def test_unknown_admin_endpoint_is_404(emu: RunningEmulator) -> None:
    assert httpx.post(f"{emu.base_url}/emulator/nope", json={}).status_code == 404
    assert httpx.get(f"{emu.base_url}/emulator/login").status_code == 404


def test_huge_is_a_well_formed_envelope_far_larger_than_any_answer(emu: RunningEmulator) -> None:
    emu.admin.faults(error="Huge", paths=[CHECK])

    response = check(emu, timeout=30)

    assert response.status_code == 200 and len(response.content) == faults.HUGE_BYTES
    body = response.json()
    assert body["status"] == "Success" and len(body["result"]["padding"]) > faults.HUGE_BYTES - 200


def test_wrong_content_type_performs_the_request_and_mislabels_the_answer(emu: RunningEmulator) -> None:
    # Given a session, and a proxy that labels Pangea's answers as HTML
    creds = log_in(emu)
    emu.admin.faults(error="WrongContentType", paths=[REFRESH])

    # When the session is refreshed
    response = http_post(emu.base_url, REFRESH, emu.service_token, {"refresh_token": creds["refresh_token"]["token"]})

    # Then the body is Pangea's envelope under a text/html label, and the refresh happened
    assert response.headers["content-type"].startswith("text/html")
    assert response.json()["status"] == "Success"
    emu.admin.clear_faults()
    again = http_post(emu.base_url, REFRESH, emu.service_token, {"refresh_token": creds["refresh_token"]["token"]})
    assert again.json()["status"] == "InvalidToken"


def test_stats_count_spent_refresh_tokens_presented_again(emu: RunningEmulator) -> None:
    # Given a session refreshed once
    creds = log_in(emu)
    spent = creds["refresh_token"]["token"]
    fresh = http_post(emu.base_url, REFRESH, emu.service_token, {"refresh_token": spent}).json()["result"]
    assert emu.admin.stats()["refresh_reused"] == 0

    # When the spent refresh token is presented again, and an unknown one once
    for token in (spent, "ptr_" + "b" * 32, spent):
        assert http_post(emu.base_url, REFRESH, emu.service_token, {"refresh_token": token}).status_code == 400

    # Then only the spent one counts as reuse, and the fresh token still works
    assert emu.admin.stats()["refresh_reused"] == 2
    ok = http_post(emu.base_url, REFRESH, emu.service_token, {"refresh_token": fresh["refresh_token"]["token"]})
    assert ok.status_code == 200
    emu.admin.reset()
    assert emu.admin.stats()["refresh_reused"] == 0


# --- the HTTP codes of answers ----------------------------------------------------------------


def test_http_codes_choose_the_code_of_each_status_and_clearing_restores_them(emu: RunningEmulator) -> None:
    # Given a Pangea that answers token verdicts and Unauthorized with other codes than ours
    creds = log_in(emu)
    emu.admin.faults(http_codes={"InvalidToken": 401, "ExpiredToken": 404, "Unauthorized": 403, "Success": 201})

    # When it answers an unknown token, a wrong bearer token and a live token
    invalid = check(emu)
    refused = http_post(emu.base_url, CHECK, "pts_" + "z" * 32, UNKNOWN)
    valid = http_post(emu.base_url, CHECK, emu.service_token, {"token": creds["active_token"]["token"]})

    # Then each keeps its envelope and status, under the chosen code, and the stats count that code
    assert (invalid.status_code, invalid.json()["status"]) == (401, "InvalidToken")
    assert (refused.status_code, refused.json()["status"]) == (403, "Unauthorized")
    assert (valid.status_code, valid.json()["status"]) == (201, "Success")
    assert_envelope(invalid, "InvalidToken")
    assert emu.admin.stats()["requests"][CHECK] == {"401": 1, "403": 1, "201": 1}

    # When the faults are cleared, the usual codes are back
    emu.admin.clear_faults()
    assert check(emu).status_code == 400


def test_a_throttle_under_another_code_still_says_when_to_come_back(emu: RunningEmulator) -> None:
    emu.admin.faults(error="TooManyRequests", retry_after=7, http_codes={"TooManyRequests": 400})
    answer = check(emu)
    assert (answer.status_code, answer.json()["status"], answer.headers["retry-after"]) == (400, "TooManyRequests", "7")


def test_the_setting_sets_the_codes_and_faults_go_over_it(emulator_server_401: RunningEmulator) -> None:
    # Given the emulator created with http_codes={"InvalidToken": 401, "ExpiredToken": 401}
    emu = emulator_server_401
    emu.admin.reset()
    assert check(emu).status_code == 401
    # When a fault names another code, it wins; cleared, the setting is back
    emu.admin.faults(http_codes={"InvalidToken": 403})
    assert check(emu).status_code == 403
    emu.admin.reset()
    assert check(emu).status_code == 401


@pytest.mark.parametrize(
    ("text", "codes"),
    [
        ("", {}),
        ("InvalidToken=401,ExpiredToken=401", {"InvalidToken": 401, "ExpiredToken": 401}),
        (" Unauthorized = 403 ,", {"Unauthorized": 403}),
    ],
)
def test_http_codes_from_the_environment(text: str, codes: dict[str, int]) -> None:
    assert faults.http_codes_from_text(text, "EMULATOR_HTTP_CODES") == codes


@pytest.mark.parametrize("text", ["InvalidToken", "InvalidToken=abc", "Teapot=418", "InvalidToken=700"])
def test_bad_http_codes_in_the_environment_name_the_variable(text: str) -> None:
    with pytest.raises(faults.BadFaults, match="EMULATOR_HTTP_CODES"):
        faults.http_codes_from_text(text, "EMULATOR_HTTP_CODES")


# --- list limits ------------------------------------------------------------------------------


def test_list_limits_from_the_setting_and_the_faults() -> None:
    from worker.emulator import create_app, validation

    app = create_app(service_token="pts_a", client_token="pcl_b", max_size=100, max_filter_ids=50)
    assert app._limits == validation.ListLimits(100, 50)
    assert faults.limit_from_text("", "EMULATOR_MAX_LIST_SIZE") is None
    assert faults.limit_from_text(" 100 ", "EMULATOR_MAX_LIST_SIZE") == 100
    for bad in ("0", "-1", "ten"):
        with pytest.raises(faults.BadFaults, match="EMULATOR_MAX_FILTER_IDS"):
            faults.limit_from_text(bad, "EMULATOR_MAX_FILTER_IDS")


def test_a_validation_error_fault_refuses_any_request(emu: RunningEmulator) -> None:
    emu.admin.faults(error="ValidationError", paths=["/v2/session/list"])
    answer = http_post(emu.base_url, "/v2/session/list", emu.service_token, {"size": 1})
    assert (answer.status_code, answer.json()["status"]) == (400, "ValidationError")
    assert answer.json()["result"]["errors"][0]["source"] == ""
    assert check(emu).json()["status"] == "InvalidToken"  # other paths answer as usual


def test_the_journal_says_how_and_when_each_session_ended(emu: RunningEmulator) -> None:
    # Given three sessions, one refreshed since its login
    a, b, c = log_in(emu, "a@example.com"), log_in(emu, "b@example.com"), log_in(emu, "c@example.com")
    fresh = http_post(emu.base_url, REFRESH, emu.service_token, {"refresh_token": b["refresh_token"]["token"]})
    assert fresh.json()["status"] == "Success"
    before = time.time()

    # When one is logged out with its active token, one with the active token its refresh replaced,
    # and one ended by its id
    for path, body in (
        ("/v2/client/session/logout", {"token": a["active_token"]["token"]}),
        ("/v2/client/session/logout", {"token": b["active_token"]["token"]}),
        ("/v2/session/invalidate", {"session_id": c["refresh_token"]["id"]}),
    ):
        assert http_post(emu.base_url, path, emu.service_token, body).json()["status"] == "Success", path

    # Then the journal tells each apart, with the time it ended; a session never ended is not in it
    ids = [s["refresh_token"]["id"] for s in (a, b, c)]
    journal = emu.admin.ended([*ids, "pmt_" + "z" * 32])
    assert [journal[i]["how"] for i in ids] == [
        "client/session/logout",
        "client/session/logout (a replaced active token)",
        "session/invalidate",
    ]
    assert all(before - 1 <= _epoch(journal[i]["at"]) <= time.time() + 1 for i in ids)
    # ... and a malformed question is refused, saying what is expected
    with pytest.raises(EmulatorAdminError, match="session_ids"):
        emu.admin.ended("pmt_x")  # type: ignore[arg-type]


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()
