"""Learning a list limit by trying: bisection between the largest accepted and the smallest refused value."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker import errors, list_limits


def learn(limit: list_limits.Limit, pangea_max: int, wanted: int, rounds: int = 40) -> tuple[int, int]:
    """Ask for ``wanted`` until Pangea (accepting up to ``pangea_max``) has answered each; (requests, refused)."""
    sent = refused = 0
    for _ in range(rounds):
        left = wanted
        while left:
            n = limit.next(left)
            sent += 1
            if n <= pangea_max:
                limit.accept(n)
                left -= n
            else:
                limit.refuse(n)
                refused += 1
    return sent, refused


@given(pangea_max=st.integers(1, 1000), wanted=st.integers(1, 1000))
def test_the_limit_is_found_and_then_kept_to(pangea_max: int, wanted: int) -> None:
    limit = list_limits.Limit("/v2/session/list", "ids")
    _, refused = learn(limit, pangea_max, wanted)
    # Refusals are few: a bisection, about log2 of the batch, never one per request
    assert refused <= 2 * wanted.bit_length() + 2
    if wanted > pangea_max:
        assert limit.known == pangea_max
        assert limit.next(wanted) == pangea_max
    else:
        assert limit.refused is None and limit.next(wanted) == wanted  # never refused: no limit learned


def test_a_fixed_chunk_caps_every_request() -> None:
    limit = list_limits.Limit("/v2/session/list", "ids", fixed=10)
    assert limit.next(250) == 10 and limit.next(3) == 3


def test_a_limit_that_moves_is_learned_again() -> None:
    limit = list_limits.Limit("/v2/session/list", "ids")
    learn(limit, 100, 250)
    assert limit.known == 100
    learn(limit, 40, 250)  # Pangea lowered it
    assert limit.known == 40
    limit.accept(120)  # ... and raised it again: probing starts over above what was accepted
    assert limit.known is None and limit.next(250) == 250


@pytest.mark.parametrize(
    ("sources", "blamed"),
    [
        (("/size",), {"size"}),
        (("/filter/active_token_id__in",), {"ids"}),
        (("/size", "/filter/id__in"), {"size", "ids"}),
        ((), {"ids"}),  # said nothing we can tell: cut the ids
        (("",), {"ids"}),
    ],
)
def test_what_a_refusal_blames(sources: tuple[str, ...], blamed: set[str]) -> None:
    exc = errors.AuthnRequestInvalid("refused", status="ValidationError", sources=sources)
    assert list_limits.blames(exc) == blamed
