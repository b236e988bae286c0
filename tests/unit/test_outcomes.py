"""The one table of Pangea's answers: the envelope's status decides, the HTTP code only without one."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker import authn, errors, wire

OUT = wire.Outcome
README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.mark.parametrize(
    ("http", "status", "outcome"),
    [
        (200, "Success", OUT.VALID),
        *[(code, "InvalidToken", OUT.INVALID) for code in (400, 401, 403, 404)],
        *[(code, "ExpiredToken", OUT.EXPIRED) for code in (400, 401, 403, 404)],
        *[(code, "Unauthorized", OUT.REJECTED_US) for code in (400, 401, 403)],
        (429, "TooManyRequests", OUT.RATE_LIMITED),
        (400, "TooManyRequests", OUT.RATE_LIMITED),
        (200, "TooManyRequests", OUT.RATE_LIMITED),
        (400, "ValidationError", OUT.REFUSED),
        (404, "NotFound", OUT.REFUSED),
        # a server error is a server error, whatever its body says (design invariant 1)
        (500, "InvalidToken", OUT.UNAVAILABLE),
        (503, "Success", OUT.UNAVAILABLE),
        (502, None, OUT.UNAVAILABLE),
        # Success only under 200, as the Go SDK requires
        (201, "Success", OUT.PROTOCOL),
        (400, "Success", OUT.PROTOCOL),
        # a status we do not know, or no envelope at all, is no answer; a bare 429 is a proxy's throttle
        (400, "DisabledUser", OUT.PROTOCOL),
        (401, None, OUT.PROTOCOL),
        (200, None, OUT.PROTOCOL),
        (429, None, OUT.RATE_LIMITED),
        # a proxy refusing the request's size speaks of its shape, envelope or not
        (413, None, OUT.REFUSED),
        (414, None, OUT.REFUSED),
    ],
)
def test_the_table(http: int, status: str | None, outcome: wire.Outcome) -> None:
    assert wire.outcome_of(http, status) is outcome


@given(http=st.integers(100, 599), status=st.one_of(st.none(), st.text(max_size=20)))
def test_only_a_known_verdict_status_under_a_working_server_is_a_verdict(http: int, status: str | None) -> None:
    outcome = wire.outcome_of(http, status)
    if outcome in wire.VERDICTS:
        assert status in ("Success", "InvalidToken", "ExpiredToken") and http < 500
        assert status != "Success" or http == 200


def test_the_readme_shows_the_same_table() -> None:
    # The README's table of statuses names each status of the code's table with its outcome
    text = README.read_text()
    for status, outcome in wire.STATUS_OUTCOMES.items():
        row = re.search(rf"^\| `{status}` \| ([^|]+) \|", text, re.MULTILINE)
        assert row is not None, f"README lacks a row for {status}"
        assert outcome.value in row.group(1), (status, row.group(1))


def _answer(http: int, body: bytes, content_type: str = "application/json") -> httpx.Response:
    return httpx.Response(http, headers={"content-type": content_type, "retry-after": "3"}, content=body)


ENVELOPE = (
    b'{"request_id": "prq_x", "request_time": "", "response_time": "", "status": "%s", "summary": "", "result": null}'
)


@pytest.mark.parametrize(
    ("http", "body", "content_type", "raised"),
    [
        (401, ENVELOPE % b"InvalidToken", "application/json", None),
        (401, ENVELOPE % b"Unauthorized", "application/json", errors.AuthnRejectedUs),
        (401, b"<html>401 Authorization Required</html>", "text/html", errors.AuthnProtocolError),
        (429, b"<html>slow down</html>", "text/html", errors.AuthnRateLimited),
        (503, ENVELOPE % b"InvalidToken", "application/json", errors.AuthnOutcomeUnknown),
        (202, ENVELOPE % b"Success", "application/json", errors.AuthnProtocolError),
        (400, ENVELOPE % b"Mystery", "application/json", errors.AuthnProtocolError),
        (401, ENVELOPE % b"InvalidToken", "text/html", errors.AuthnProtocolError),
        (413, b"<html>413 Request Entity Too Large</html>", "text/html", errors.AuthnRequestInvalid),
    ],
)
def test_classify_raises_by_class(http: int, body: bytes, content_type: str, raised: type[Exception] | None) -> None:
    response = _answer(http, body, content_type)
    if raised is None:
        env = authn._classify(response, body, "/v2/client/session/refresh", None, idempotent=False)
        assert env.status == "InvalidToken"
        return
    with pytest.raises(raised):
        authn._classify(response, body, "/v2/client/session/refresh", None, idempotent=False)
