"""The emulator against Pangea's OpenAPI spec (``authn_spec``, read at test time, never copied in).

Every answer of a scenario that covers all endpoints is validated against the spec's schema for its
path and HTTP status, and every request body is judged by the spec's request schema too: the
emulator must refuse (ValidationError) exactly the bodies the spec calls invalid. Then hypothesis
throws random bodies at every endpoint: never a 5xx, always the six-key envelope.

Two places where the spec cannot be taken literally, both handled by a relaxed copy made in memory:

- ``pangea-response`` declares ``status: enum ["Success"]`` and ``result: object`` for *every*
  response, the spec's own "400 Validation errors" included, which no server could satisfy. Error
  answers are validated with ``status`` any string and ``result`` an object or null.
- The spec documents no schema for InvalidToken, ExpiredToken, Unauthorized or NotFound; those are
  validated as that relaxed envelope, with the bodies of Pangea's guide (``result: null``).

The emulator is knowingly stricter than the spec on the two session lists (unknown filter keys and
malformed date-times are refused, cursors must be its own), so there only "spec-invalid ⇒ refused"
is required.
"""

from __future__ import annotations

import copy
import json
import re
import string
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from tests.conftest import RunningEmulator
from worker.emulator import handlers

pytestmark = pytest.mark.timeout(120)

SPEC_URI = "urn:pangea:authn"
API_PATHS = sorted(handlers.ROUTES)
LIST_PATHS = {"/v2/session/list", "/v2/client/session/list"}
ENVELOPE_KEYS = {"request_id", "request_time", "response_time", "status", "summary", "result"}
ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")
REQUEST_ID = re.compile(r"^prq_[a-z2-7]{32}$")


@dataclass(frozen=True)
class Exchange:
    """One request to the emulator and its answer."""

    path: str
    body: Any  # the JSON value sent, or bytes sent as they are
    response: httpx.Response

    @property
    def status(self) -> str:
        return str(self.response.json()["status"])


class Spec:
    """Validators built from the spec: responses by path and HTTP status, requests by path."""

    def __init__(self, spec: dict[str, Any]) -> None:
        relaxed = copy.deepcopy(spec)
        envelope = relaxed["components"]["schemas"]["pangea-response"]["properties"]
        envelope["status"] = {"type": "string"}
        envelope["result"] = {"type": ["object", "null"]}
        self._strict = _registry(spec)
        self._relaxed = _registry(relaxed)

    def response_errors(self, exchange: Exchange) -> list[str]:
        """Why this answer does not conform to the spec (empty if it does)."""
        code, status = exchange.response.status_code, exchange.status
        if code == 200:
            pointer, registry = (
                f"{_path_pointer(exchange.path)}/responses/200/content/application~1json/schema",
                self._strict,
            )
        elif status == "ValidationError":
            pointer, registry = (
                f"{_path_pointer(exchange.path)}/responses/400/content/application~1json/schema",
                self._relaxed,
            )
        else:
            pointer, registry = "/components/schemas/pangea-response", self._relaxed
        validator = Draft202012Validator({"$ref": f"{SPEC_URI}#{pointer}"}, registry=registry)
        return [
            f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in validator.iter_errors(exchange.response.json())
        ]

    def request_is_valid(self, path: str, body: Any) -> bool:
        """Whether the spec accepts this request body."""
        pointer = f"{_path_pointer(path)}/requestBody/content/application~1json/schema"
        return bool(Draft202012Validator({"$ref": f"{SPEC_URI}#{pointer}"}, registry=self._strict).is_valid(body))


def _registry(spec: dict[str, Any]) -> Registry[Any]:
    registry: Registry[Any] = Registry().with_resource(
        SPEC_URI, Resource.from_contents(spec, default_specification=DRAFT202012)
    )
    return registry


def _path_pointer(path: str) -> str:
    return "/paths/" + path.replace("~", "~0").replace("/", "~1") + "/post"


@pytest.fixture(scope="module")
def spec(authn_spec: dict[str, Any]) -> Spec:
    return Spec(authn_spec)


@pytest.fixture
def http(emu: RunningEmulator) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=emu.base_url, headers={"Authorization": f"Bearer {emu.service_token}"}) as client:
        yield client


def post(http: httpx.Client, path: str, body: Any, *, token: str | None = None) -> Exchange:
    """POST a JSON value (or raw bytes) to the emulator."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = http.post(path, content=content, headers={"Content-Type": "application/json", **headers})
    return Exchange(path, body, response)


def assert_envelope(exchange: Exchange) -> None:
    """Pangea's envelope: exactly six keys, the request id in the header, ISO-8601 UTC times, JSON."""
    response = exchange.response
    body = response.json()
    assert set(body) == ENVELOPE_KEYS, body
    assert response.headers["content-type"] == "application/json"
    assert REQUEST_ID.match(body["request_id"]) and response.headers["x-request-id"] == body["request_id"]
    assert ISO_UTC.match(body["request_time"]) and ISO_UTC.match(body["response_time"])
    assert body["request_time"] <= body["response_time"]
    assert isinstance(body["status"], str) and isinstance(body["summary"], str) and body["summary"]


def scenario(emu: RunningEmulator, http: httpx.Client) -> list[Exchange]:
    """Every endpoint, with its successes, validation errors and token answers."""
    seen: list[Exchange] = []

    def call(path: str, body: Any, **kw: Any) -> dict[str, Any]:
        seen.append(post(http, path, body, **kw))
        return dict(seen[-1].response.json())

    def refuse(path: str, *bodies: Any) -> None:
        for body in bodies:
            call(path, body)

    code = emu.admin.login("ada@example.com", profile={"first_name": "Ada"})
    first = call("/v2/client/userinfo", {"code": code})["result"]
    call("/v2/client/userinfo", {"code": code})  # spent
    refuse(
        "/v2/client/userinfo",
        {},
        {"code": "pmc_x"},
        {"code": 7},
        {"code": code, "flow_id": "nope"},
        {"code": code, "more": 1},
    )
    short = call("/v2/client/userinfo", {"code": emu.admin.login("short@example.com", active_ttl=1, refresh_ttl=1)})

    active, refresh = first["active_token"]["token"], first["refresh_token"]["token"]
    for token in (active, refresh, emu.service_token, emu.client_token, "ptu_" + "a" * 32):
        call("/v2/client/token/check", {"token": token})
    refuse("/v2/client/token/check", {}, {"token": None}, {"token": "x"}, {"token": active, "x": 1}, [])

    renewed = call("/v2/client/session/refresh", {"refresh_token": refresh, "user_token": active})["result"]
    call("/v2/client/session/refresh", {"refresh_token": refresh})  # spent
    refuse(
        "/v2/client/session/refresh",
        {},
        {"refresh_token": active},
        {"refresh_token": renewed["refresh_token"]["token"], "user_token": 1},
    )

    active = renewed["active_token"]["token"]
    second = call("/v2/client/userinfo", {"code": emu.admin.login("ada@example.com")})["result"]
    page = call("/v2/client/session/list", {"token": active, "size": 1, "order": "desc", "order_by": "created_at"})
    call("/v2/client/session/list", {"token": active, "size": 1, "last": page["result"]["last"]})
    call("/v2/client/session/list", {"token": active, "filter": {"email": "ada@example.com"}})
    call("/v2/client/session/list", {"token": "ptu_" + "b" * 32})
    refuse(
        "/v2/client/session/list",
        {},
        {"token": active, "size": "1"},
        {"token": active, "count": 1},
        {"token": active, "order": "up"},
    )

    listed = call("/v2/session/list", {"filter": {"identity": first["active_token"]["identity"]}, "size": 1})
    call(
        "/v2/session/list",
        {"last": listed["result"]["last"], "size": 1, "filter": {"identity": first["active_token"]["identity"]}},
    )
    call(
        "/v2/session/list",
        {"filter": {"active_token_id__in": [renewed["active_token"]["id"]], "profile_first_name": "Ada"}},
    )
    call("/v2/session/list", {})
    refuse(
        "/v2/session/list",
        {"size": 0},
        {"order_by": "name"},
        {"filter": []},
        {"filter": {"id__in": "pmt_x"}},
        {"last": 1},
    )

    session_id = second["refresh_token"]["id"]
    call("/v2/client/session/invalidate", {"token": active, "session_id": session_id})
    call("/v2/client/session/invalidate", {"token": active, "session_id": session_id})  # already ended
    refuse(
        "/v2/client/session/invalidate",
        {"token": active},
        {"token": active, "session_id": "pmt_"},
        {"token": 1, "session_id": session_id},
    )

    other = call("/v2/client/userinfo", {"code": emu.admin.login("bob@example.com")})["result"]
    call("/v2/session/invalidate", {"session_id": other["refresh_token"]["id"], "user_initiated": True})
    call("/v2/session/invalidate", {"session_id": other["refresh_token"]["id"]})  # already ended
    refuse(
        "/v2/session/invalidate",
        {},
        {"session_id": "pui_" + "a" * 32},
        {"session_id": other["refresh_token"]["id"], "user_initiated": "yes"},
    )

    call("/v2/client/session/logout", {"token": active})
    call("/v2/client/session/logout", {"token": active})  # already ended
    refuse("/v2/client/session/logout", {}, {"token": refresh}, {"token": ["ptu_"]})

    call("/v2/session/logout", {"user_id": first["active_token"]["identity"]})
    call("/v2/session/logout", {"user_id": "pui_" + "c" * 32})
    refuse("/v2/session/logout", {}, {"user_id": "<script>"}, {"user_id": None})

    call("/v2/client/jwks", {})
    refuse("/v2/client/jwks", {"keys": 1}, "jwks", None)

    time.sleep(1.1)
    call("/v2/client/token/check", {"token": short["result"]["active_token"]["token"]})
    call("/v2/client/session/refresh", {"refresh_token": short["result"]["refresh_token"]["token"]})
    for path in ("/v2/client/token/check", "/v2/session/list"):
        call(path, b"{not json")
        call(path, {"token": active}, token="pts_" + "z" * 32)
    call("/v2/session/list", {}, token=emu.client_token)
    call("/v2/user/list", {})
    return seen


def test_every_answer_conforms_to_the_spec(emu: RunningEmulator, http: httpx.Client, spec: Spec) -> None:
    # Given a scenario that visits every endpoint, its successes and its refusals
    exchanges = scenario(emu, http)

    # Then each path answered at least one Success and one ValidationError
    for path in API_PATHS:
        statuses = {x.status for x in exchanges if x.path == path}
        assert {"Success", "ValidationError"} <= statuses, (path, statuses)
    assert {x.status for x in exchanges} == {
        "Success",
        "ValidationError",
        "InvalidToken",
        "ExpiredToken",
        "Unauthorized",
        "NotFound",
    }

    # And every answer is Pangea's envelope and valid against the spec's schema for its path and status
    problems = {}
    for x in exchanges:
        assert_envelope(x)
        if errors := spec.response_errors(x):
            problems[f"{x.path} {x.response.status_code} {x.status}"] = errors
    assert problems == {}

    # And the emulator refused (ValidationError) exactly the bodies the spec calls invalid
    for x in exchanges:
        if x.path in handlers.ROUTES and x.response.status_code not in (401,) and not isinstance(x.body, bytes):
            assert (x.status == "ValidationError") == (not spec.request_is_valid(x.path, x.body)), (x.path, x.body)


def test_error_answers_carry_pangeas_codes_and_summaries(emu: RunningEmulator, http: httpx.Client) -> None:
    exchanges = scenario(emu, http)
    expected = {
        "ValidationError": 400,
        "InvalidToken": 400,
        "ExpiredToken": 400,
        "Unauthorized": 401,
        "NotFound": 404,
        "Success": 200,
    }
    for x in exchanges:
        assert x.response.status_code == expected[x.status], (x.path, x.status)
        body = x.response.json()
        if x.status in ("InvalidToken", "ExpiredToken", "Unauthorized", "NotFound"):
            assert body["result"] is None
        if x.status == "ValidationError":
            assert all(set(e) == {"code", "detail", "source"} for e in body["result"]["errors"])
    summaries = {x.status: x.response.json()["summary"] for x in exchanges}
    assert summaries["InvalidToken"] == "The token does not exist"
    assert summaries["ExpiredToken"] == "The token is no longer valid"
    assert summaries["Unauthorized"] == "Not authorized to access this resource"


@pytest.mark.parametrize("path", API_PATHS)
def test_the_specs_own_request_examples_are_accepted(
    http: httpx.Client, spec: Spec, authn_spec: dict[str, Any], path: str
) -> None:
    schema = authn_spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
    for example in schema.get("examples", []):
        exchange = post(http, path, example)
        assert exchange.status != "ValidationError", (example, exchange.response.json())
        assert_envelope(exchange)
        assert spec.response_errors(exchange) == []


# --- random bodies ----------------------------------------------------------------------------------

BASE32 = "abcdefghijklmnopqrstuvwxyz234567"
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(codec="utf-8"), max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)
pangea_ids = st.builds(
    "{}{}".format,
    st.sampled_from(["ptu_", "ptr_", "pmt_", "pmc_", "pts_", "pcl_", "pui_", "pfl_", "pti_"]),
    st.text(BASE32, min_size=30, max_size=33),
)
plausible = pangea_ids | st.sampled_from(["a.b.c", "asc", "desc", "email", "created_at", "2024-01-01T00:00:00Z"])


def field_values(name: str) -> st.SearchStrategy[Any]:
    """Anything JSON for a field, with a bias toward values of the right shape."""
    if name == "size":
        return st.integers(min_value=-2, max_value=50) | json_values
    if name == "filter":
        keys = st.sampled_from(
            [
                "id",
                "id__in",
                "identity",
                "email__contains",
                "active_token_id__in",
                "created_at__gt",
                "expire",
                "type",
                "enabled",
                "scopes",
                "profile_first_name",
                "profile_x__exists",
                "username__in",
                "bogus",
            ]
        )
        values = plausible | st.lists(plausible, max_size=3) | json_values
        return st.dictionaries(keys, values, max_size=4) | json_values
    return plausible | json_values


def request_bodies(spec: dict[str, Any], path: str) -> st.SearchStrategy[Any]:
    """Random bodies for ``path``: any JSON, or objects of its known fields with random values (plus strays)."""
    schema = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
    fields = dict(schema.get("properties", {}))
    if "$ref" in schema:
        fields |= spec["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]["properties"]
    known = st.fixed_dictionaries({}, optional={name: field_values(name) for name in fields})
    strays = st.dictionaries(st.text(string.ascii_lowercase + "_", min_size=1, max_size=8), json_values, max_size=2)
    return json_values | known | st.builds(lambda a, b: {**b, **a}, known, strays)


@pytest.mark.parametrize("path", API_PATHS)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_bodies_never_break_the_envelope(
    http: httpx.Client, spec: Spec, authn_spec: dict[str, Any], path: str, data: st.DataObject
) -> None:
    # Given any JSON body, or one made of the endpoint's fields with random values
    body = data.draw(request_bodies(authn_spec, path), label="body")

    # When it is posted with the service token
    exchange = post(http, path, body)

    # Then the answer is Pangea's envelope, never a 5xx, and refusals follow the spec
    assert exchange.response.status_code < 500
    assert_envelope(exchange)
    assert spec.response_errors(exchange) == []
    refused = exchange.status == "ValidationError"
    if not spec.request_is_valid(path, body):
        assert refused, body
    elif path not in LIST_PATHS:
        assert not refused, exchange.response.json()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(API_PATHS), raw=st.binary(max_size=64))
def test_random_bytes_are_validation_errors(http: httpx.Client, path: str, raw: bytes) -> None:
    exchange = post(http, path, raw)
    assert exchange.response.status_code < 500
    assert_envelope(exchange)
    try:
        json.loads(raw)
    except ValueError:
        assert exchange.status == "ValidationError"
        assert exchange.response.json()["result"]["errors"][0]["code"] == "BadFormat"


def test_list_limit_refusals_are_pangeas_validation_envelope(
    emu: RunningEmulator, http: httpx.Client, spec: Spec
) -> None:
    # Given a Pangea that lists at most 2 results and 2 filter ids per request
    token = post(http, "/v2/client/userinfo", {"code": emu.admin.login("ada@example.com")}).response.json()
    user_token = token["result"]["active_token"]["token"]
    emu.admin.faults(max_size=2, max_filter_ids=2)
    ids = ["pmt_" + c * 32 for c in "abc"]

    # When list requests above the limits come, on both list endpoints
    exchanges = [
        post(http, "/v2/session/list", {"size": 3}),
        post(http, "/v2/session/list", {"filter": {"active_token_id__in": ids}, "size": 2}),
        post(http, "/v2/client/session/list", {"token": user_token, "filter": {"id__in": ids}, "size": 3}),
    ]
    within = post(http, "/v2/session/list", {"filter": {"active_token_id__in": ids[:2]}, "size": 2})

    # Then each is refused with HTTP 400 ValidationError, valid against the spec, naming what broke a limit
    assert [x.status for x in exchanges] == ["ValidationError"] * 3 and within.status == "Success"
    assert all(x.response.status_code == 400 and not spec.response_errors(x) for x in exchanges)
    blamed = [[(e["code"], e["source"]) for e in x.response.json()["result"]["errors"]] for x in exchanges]
    assert blamed == [
        [("IsTooBig", "/size")],
        [("AboveMaxItems", "/filter/active_token_id__in")],
        [("IsTooBig", "/size"), ("AboveMaxItems", "/filter/id__in")],
    ]
