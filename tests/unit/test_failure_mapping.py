"""One mapping from the error tree to "no answer, for this reason", used by the sync engine and the outbox.

Both read it through :func:`worker.decisions.failed`: the engine decides a session from the Answer, the
outbox turns it into a delivery outcome (``final``: Pangea refused the request itself, so a logout is a
dead letter at once).
"""

from __future__ import annotations

import pytest

from worker import decisions, errors
from worker.decisions import Failure


@pytest.mark.parametrize(
    ("error", "failure", "final"),
    [
        (errors.AuthnRejectedUs("Unauthorized"), Failure.REJECTED_US, False),
        (errors.OurTokenRejected("Unauthorized"), Failure.REJECTED_US, False),
        (errors.AuthnRateLimited("429", retry_after=7.0), Failure.RATE_LIMITED, False),
        (errors.AuthnOutcomeUnknown("lost"), Failure.OUTCOME_UNKNOWN, False),
        (errors.AuthnUnreachable("refused"), Failure.UNAVAILABLE, False),
        (errors.AuthnUnavailable("500"), Failure.UNAVAILABLE, False),
        (errors.AuthnProtocolError("not JSON"), Failure.PROTOCOL, False),
        (errors.AuthnRequestRejected("NotFound", status="NotFound"), Failure.PROTOCOL, True),
        (errors.AuthnRequestInvalid("ValidationError", status="ValidationError"), Failure.PROTOCOL, True),
        (errors.CryptoError(), Failure.UNAVAILABLE, False),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, Exception) else None,
)
def test_each_error_stands_for_one_failure(error: errors.SessionSyncError, failure: Failure, final: bool) -> None:
    answer = decisions.failed(error)
    # Never a verdict: only Pangea's answers may revoke
    assert answer.verdict is None
    assert (answer.failure, answer.final) == (failure, final)
    assert answer.retry_after == (7.0 if failure is Failure.RATE_LIMITED else None)


def test_the_request_id_of_a_failed_attempt_is_kept_for_the_audit_trail() -> None:
    assert decisions.failed(errors.AuthnUnavailable("500", request_id="prq_1")).request_id == "prq_1"
