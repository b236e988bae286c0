"""The envelope parser and result types: strict about Pangea's shape, never crashing on junk."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker import errors, wire

TOKEN = {
    "id": "pmt_" + "a" * 32,
    "type": "user",
    "identity": "pui_" + "b" * 32,
    "email": "ada@example.com",
    "expire": "2026-11-29T10:00:00.123456789Z",
    "life": 3600,
    "created_at": "2026-11-28T10:00:00Z",
    "profile": {"first_name": "Ada"},
    "token": "ptu_" + "c" * 32,
}


def envelope(**overrides: object) -> bytes:
    body = {
        "request_id": "prq_" + "d" * 32,
        "request_time": "2026-11-28T10:00:00Z",
        "response_time": "2026-11-28T10:00:00Z",
        "status": "Success",
        "summary": "ok",
        "result": {},
    } | overrides
    return json.dumps(body).encode()


def test_parses_a_success_envelope() -> None:
    env = wire.parse_envelope(envelope(result={"x": 1}), path="/p", header_request_id=None)
    assert env.status == "Success" and env.result == {"x": 1} and env.request_id.startswith("prq_")


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (b"<html>502 Bad Gateway</html>", "not JSON"),
        (b"[1, 2]", "not a JSON object"),
        (envelope()[:-1], "not JSON"),
        (json.dumps({"status": "Success", "summary": "", "result": None}).encode(), "lacks request_id"),
        (envelope(status=1), "wrong type"),
        (envelope(summary=None), "wrong type"),
    ],
)
def test_rejects_what_is_not_pangeas_envelope(body: bytes, problem: str) -> None:
    with pytest.raises(errors.AuthnProtocolError, match=problem):
        wire.parse_envelope(body, path="/p", header_request_id="prq_h")


def test_token_info_keeps_nanosecond_timestamps_and_hides_the_secret() -> None:
    info = wire.TokenInfo.from_wire(TOKEN, where="result")
    assert info.expire.microsecond == 123456 and info.expire.tzinfo is not None
    assert str(TOKEN["token"]) not in repr(info)


@pytest.mark.parametrize(
    ("field", "value"),
    [("id", None), ("life", "3600"), ("life", True), ("expire", "tomorrow"), ("profile", {"age": 3}), ("scopes", "x")],
)
def test_token_info_rejects_wrong_types(field: str, value: object) -> None:
    with pytest.raises(errors.AuthnProtocolError, match=field):
        wire.TokenInfo.from_wire(TOKEN | {field: value}, where="result")


def test_session_creds_need_both_secrets() -> None:
    result = {"active_token": TOKEN, "refresh_token": TOKEN | {"token": None, "type": "session"}}
    with pytest.raises(errors.AuthnProtocolError, match="secret"):
        wire.SessionCreds.from_wire(result, request_id="prq_x")


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        (None, None),
        ("", None),
        ("7", 7.0),
        ("2.5", 2.5),
        ("-3", 0.0),
        ("soon", None),
        ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),
    ],
)
def test_retry_after(header: str | None, seconds: float | None) -> None:
    assert wire.parse_retry_after(header) == seconds


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=6),
    max_leaves=20,
)


@given(st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode()))
def test_any_body_is_an_envelope_or_a_protocol_error(body: bytes) -> None:
    try:
        env = wire.parse_envelope(body, path="/p", header_request_id=None)
    except errors.AuthnProtocolError:
        return
    assert isinstance(env.status, str) and isinstance(env.request_id, str)


@given(st.dictionaries(st.sampled_from(sorted(TOKEN)), json_values, max_size=10))
def test_any_result_is_a_session_page_or_a_protocol_error(item: dict[str, object]) -> None:
    for result in ({"sessions": [item], "last": ""}, item, {"sessions": item}):
        try:
            wire.SessionPage.from_wire(result, request_id="prq_x")
        except errors.AuthnProtocolError:
            pass


def test_creds_round_trip_through_the_userinfo_envelope() -> None:
    refresh = TOKEN | {"id": "pmt_" + "r" * 32, "type": "session", "token": "ptr_" + "e" * 32}
    creds = wire.SessionCreds.from_wire({"active_token": TOKEN, "refresh_token": refresh}, request_id="prq_x")
    envelope = creds.to_userinfo()
    assert envelope["status"] == "Success"
    assert wire.SessionCreds.from_wire(envelope["result"], request_id="prq_x") == creds


# A session list takes a fast path (one pass of type tests, objects built through their slots) and
# falls back to the checked one, field by field, for anything it does not accept. Both must agree.
_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 5),
    st.sampled_from(["", "pmt_x", "2026-11-29T10:00:00.123456789Z", "2026-11-28T10:00:00", "not a time"]),
    st.lists(st.sampled_from(["a", 1]), max_size=2),
    st.dictionaries(st.sampled_from(["k", "first_name"]), st.sampled_from(["v", 2]), max_size=2),
)
_token_like = st.fixed_dictionaries(
    {},
    optional={k: _values for k in ("id", "type", "identity", "email", "expire", "life", "created_at", "profile")}
    | {"scopes": _values, "token": _values},
)


def _both(
    cls: type[wire.TokenInfo] | type[wire.SessionItem] | type[wire.ListedSession], data: object
) -> tuple[object, object]:
    """What ``cls.from_wire`` and the checked path make of ``data`` (an error as its type)."""
    results: list[object] = []
    for parse in (lambda: cls.from_wire(data, where="result"), lambda: cls._checked(data, "result")):
        try:
            results.append(parse())
        except errors.AuthnProtocolError as exc:
            results.append(type(exc))
    return results[0], results[1]


@given(st.one_of(_token_like, st.just(TOKEN), st.builds(lambda extra: TOKEN | extra, _token_like)))
def test_the_fast_token_parser_agrees_with_the_checked_one(data: dict[str, object]) -> None:
    fast, checked = _both(wire.TokenInfo, data)
    assert fast == checked


@given(
    st.fixed_dictionaries(
        {},
        optional={k: _values for k in ("id", "identity", "email", "expire", "created_at")}
        | {"active_token": st.one_of(st.none(), st.just(TOKEN), _token_like)},
    )
)
def test_the_fast_session_parser_agrees_with_the_checked_one(data: dict[str, object]) -> None:
    fast, checked = _both(wire.SessionItem, data)
    assert fast == checked


_listed_like = st.fixed_dictionaries(
    {}, optional={"id": _values, "active_token": st.one_of(st.none(), st.just(TOKEN), _token_like, _values)}
)


@given(st.one_of(_listed_like, st.builds(lambda extra: {"id": "pmt_s", "active_token": TOKEN} | extra, _listed_like)))
def test_the_listed_session_parsers_agree_and_read_only_what_the_sync_needs(data: dict[str, object]) -> None:
    fast, checked = _both(wire.ListedSession, data)
    assert fast == checked
    # A session the full parser accepts is listed with the same id and active token
    try:
        full = wire.SessionItem.from_wire(data, where="result")
    except errors.AuthnProtocolError:
        return
    assert isinstance(fast, wire.ListedSession) and fast.id == full.id
    token = full.active_token
    assert (fast.active_token_id, fast.active_expire) == ((token.id, token.expire) if token else (None, None))


def test_a_listed_page_ignores_what_it_does_not_read_and_names_what_it_cannot() -> None:
    # Fields the sync never reads may be missing or of any shape: a Pangea that adds, drops or retypes
    # them still answers for its sessions
    sparse = {"id": "pmt_s", "email": 7, "active_token": {"id": "pmt_a", "expire": "2026-11-29T10:00:00.5Z"}}
    page = wire.ListedPage.from_wire({"sessions": [sparse, {"id": "pmt_t"}], "last": "c"}, request_id="prq_x")
    assert [(s.id, s.active_token_id) for s in page.sessions] == [("pmt_s", "pmt_a"), ("pmt_t", None)]
    assert page.sessions[0].active_expire is not None and page.sessions[0].active_expire.microsecond == 500000
    assert page.last == "c" and page.request_id == "prq_x"
    # What it does read is checked, and a bad one is named
    bad = {"sessions": [sparse, {"id": "pmt_u", "active_token": {"id": "pmt_b", "expire": "soon"}}]}
    with pytest.raises(errors.AuthnProtocolError, match=r"result\.sessions\[1\]\.active_token\.expire"):
        wire.ListedPage.from_wire(bad, request_id="prq_x")
    with pytest.raises(errors.AuthnProtocolError, match=r"result\.sessions\[0\]\.id"):
        wire.ListedPage.from_wire({"sessions": [{"active_token": None}]}, request_id="prq_x")
    with pytest.raises(errors.AuthnProtocolError, match=r"result\.sessions is not a list"):
        wire.ListedPage.from_wire({"sessions": {}}, request_id="prq_x")


def _generally(body: bytes) -> object:
    """What the general way makes of a list answer's body: its page, or the error's type."""
    try:
        env = wire.parse_envelope(body, path="/v2/session/list", header_request_id=None)
        if env.status != "Success":
            return env.status
        return wire.ListedPage.from_wire(env.result, request_id=env.request_id)
    except errors.AuthnProtocolError as exc:
        return type(exc)


_list_results = st.fixed_dictionaries(
    {},
    optional={
        "sessions": st.lists(_listed_like | st.just({"id": "pmt_s", "active_token": TOKEN}), max_size=3) | _values,
        "last": st.just("c") | _values,
        "count": _values | st.floats(),
    },
)
_envelopes = st.fixed_dictionaries(
    {
        "request_id": st.just("prq_x"),
        "status": st.just("Success") | st.sampled_from(["InvalidToken", 3]),
        "summary": st.just("ok"),
        "result": _list_results,
    }
) | st.fixed_dictionaries(
    {"status": st.just("Success")},
    optional={"request_id": _values, "summary": _values, "result": _list_results | _values},
)


@given(_envelopes | json_values)
def test_a_list_answer_decoded_in_one_pass_is_the_page_the_general_way_makes(data: object) -> None:
    body = json.dumps(data).encode()
    env = wire.decode_listed_page(body)
    if env is None:
        return  # the general way reads it, as it always did
    assert env.status == "Success" and isinstance(env.result, wire.ListedPage)
    assert env.result == _generally(body)


def test_a_well_formed_list_answer_is_decoded_in_one_pass() -> None:
    item = {"id": "pmt_s", "email": "e", "profile": {"a": "b"}, "active_token": TOKEN}
    body = {"request_id": "prq_x", "request_time": "t", "response_time": "t", "status": "Success", "summary": "ok"}
    env = wire.decode_listed_page(json.dumps(body | {"result": {"sessions": [item, {"id": "pmt_t"}]}}).encode())
    assert env is not None and env.request_id == "prq_x"
    token = wire.TokenInfo.from_wire(TOKEN, where="t")
    assert env.result == wire.ListedPage(
        sessions=(
            wire.ListedSession("pmt_s", token.id, token.expire),
            wire.ListedSession("pmt_t", None, None),
        ),
        last="",
        request_id="prq_x",
    )
    # A refusal, or a body of another shape, is left to the general way
    for other in ({"status": "ValidationError", "result": {}}, {"status": "Success", "result": {"sessions": 1}}):
        assert wire.decode_listed_page(json.dumps(body | other).encode()) is None
