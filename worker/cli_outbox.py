"""``session-sync logout`` and ``session-sync outbox``: log sessions out, and look after the logout outbox.

Registered on the main group by ``worker.cli`` (``main.add_command``). Like the rest of the CLI, an
edge: it reads settings once, opens a runtime, and calls ``worker.sessions`` and ``worker.outbox_queries``.
Nothing printed here ever holds a token.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import click
import pydantic

from worker import cli_support, models, operations, sessions, settings
from worker import outbox_queries as oq

_DURATION = pydantic.TypeAdapter(settings.Duration)
_clear_errors = cli_support.clear_errors
_runtime = cli_support.make_runtime


def _parse_duration(ctx: click.Context, param: click.Parameter, value: str | None) -> timedelta | None:
    if value is None:
        return None
    try:
        return _DURATION.validate_python(value)
    except pydantic.ValidationError:
        raise click.BadParameter("expected a duration such as 30d, 12h, 90m or 3600 (seconds)") from None


def _check_reason(ctx: click.Context, param: click.Parameter, value: str) -> str:
    try:
        return sessions.check_reason(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@click.command()
@click.option("--session", "session_id", type=cli_support.ROW_ID, help="One local session id.")
@click.option("--user", "user_id", help="Every session of this Pangea user id (pui_...), with /v2/session/logout.")
@click.option(
    "--reason",
    default="operator_logout",
    show_default=True,
    callback=_check_reason,
    help="The end reason recorded locally.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@_clear_errors
def logout(session_id: int | None, user_id: str | None, reason: str, as_json: bool) -> None:
    """End local sessions now and queue their logout at Pangea (delivered by the worker)."""
    if (session_id is None) == (user_id is None):
        raise click.UsageError("say exactly one of --session ID, --user ID")
    rt = _runtime()
    try:
        with rt.sessions.begin() as db:
            if session_id is not None:
                row = sessions.logout(db, session_id, reason=reason)
                result: dict[str, Any] = {
                    "session_id": row.id,
                    "user_id": row.user_id,
                    "state": str(row.state),
                    "end_reason": row.end_reason,
                }
            else:
                assert user_id is not None
                done = sessions.logout_user(db, user_id, reason=reason)
                result = {"user_id": done.user_id, "session_ids": list(done.session_ids), "event_id": done.event_id}
    finally:
        rt.close()
    if as_json:
        click.echo(json.dumps(result, sort_keys=True))
    elif session_id is not None:
        click.echo(f"session {result['session_id']} of {result['user_id']}: {result['state']} ({result['end_reason']})")
    else:
        ended = ", ".join(map(str, result["session_ids"])) or "none still active"
        click.echo(f"user {result['user_id']}: ended {ended}; Pangea logout queued as event {result['event_id']}")


@click.command()
@click.option("--dead", "only_dead", is_flag=True, help="List dead letters only.")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(1, 100_000), help="Rows to list.")
@click.option("--retry-dead", is_flag=True, help="Put dead letters back to pending (all, or those named by --id).")
@click.option(
    "--id", "event_ids", type=cli_support.ROW_ID, multiple=True, help="With --retry-dead: only this event (repeatable)."
)
@click.option(
    "--purge-delivered",
    "older_than",
    callback=_parse_duration,
    metavar="OLDER_THAN",
    help="Delete events delivered more than OLDER_THAN ago (e.g. 30d).",
)
@click.option("--deliver", is_flag=True, help="Deliver due logouts now, in this process (no broker; for cron).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@_clear_errors
def outbox(
    only_dead: bool,
    limit: int,
    retry_dead: bool,
    event_ids: Sequence[int],
    older_than: timedelta | None,
    deliver: bool,
    as_json: bool,
) -> None:
    """List pending and dead logouts (never a token); retry dead letters; purge delivered ones."""
    if sum((retry_dead, older_than is not None, deliver)) > 1:
        raise click.UsageError("say at most one of --retry-dead, --purge-delivered, --deliver")
    if event_ids and not retry_dead:
        raise click.UsageError("--id goes with --retry-dead")
    rt = _runtime()
    try:
        if retry_dead:
            with rt.sessions.begin() as db:
                ids = oq.retry_dead(db, now=_now(), event_ids=list(event_ids) or None)
                if missing := sorted(set(event_ids) - set(ids)):  # raising rolls the retries back
                    raise click.ClickException(f"no dead letter to retry with id {_ids(missing)}; nothing retried")
            _report({"retried": ids}, as_json, f"{len(ids)} dead letter(s) back to pending: {_ids(ids)}")
        elif older_than is not None:
            with rt.sessions.begin() as db:
                purged = oq.purge_delivered(db, before=_now() - older_than)
            _report({"purged": purged}, as_json, f"{purged} delivered event(s) purged")
        elif deliver:
            counts = operations.deliver_logouts(rt)
            _report(counts, as_json, "  ".join(f"{k}={v}" for k, v in counts.items()))
        else:
            states = [models.OutboxState.DEAD] if only_dead else [models.OutboxState.PENDING, models.OutboxState.DEAD]
            with rt.sessions() as db:
                rows = oq.list_events(db, states=states, limit=limit)
            _list(rows, as_json)
    finally:
        rt.close()


def _now() -> datetime:
    return datetime.now(UTC)


def _ids(ids: Sequence[int]) -> str:
    return ", ".join(map(str, ids)) if ids else "-"


def _report(data: Mapping[str, Any], as_json: bool, text: str) -> None:
    click.echo(json.dumps(data, sort_keys=True) if as_json else text)


def _list(rows: Sequence[oq.EventView], as_json: bool) -> None:
    now = _now()
    if as_json:
        click.echo(json.dumps([_as_json(r, now) for r in rows], sort_keys=True))
        return
    if not rows:
        click.echo("no pending or dead logouts")
        return
    click.echo(f"{'id':>8}  {'state':<8} {'kind':<8} {'session':>8}  {'user':<36} {'tries':>5}  {'age':>8}  last error")
    for r in rows:
        session = str(r.session_id) if r.session_id is not None else "-"
        click.echo(
            f"{r.id:>8}  {r.state!s:<8} {r.kind!s:<8} {session:>8}  {r.user_id:<36} {r.attempts:>5}  "
            f"{_age(now - r.created_at):>8}  {r.last_error or ''}"
        )


def _as_json(r: oq.EventView, now: datetime) -> dict[str, Any]:
    return {
        "id": r.id,
        "state": str(r.state),
        "kind": str(r.kind),
        "session_id": r.session_id,
        "user_id": r.user_id,
        "attempts": r.attempts,
        "last_error": r.last_error,
        "age_seconds": round((now - r.created_at).total_seconds(), 3),
        "next_attempt_at": r.next_attempt_at.isoformat(),
        "dead_at": r.dead_at.isoformat() if r.dead_at else None,
    }


def _age(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"
