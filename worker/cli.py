"""The ``session-sync`` command line: an edge, like the Celery app. It reads settings and calls in."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from typing import Any, cast

import click

from worker import checks, cli_outbox, cli_support, errors, forks, logs, operations, progress, runtime
from worker import db as dbmod
from worker.reports import SessionReport, StatusReport

clear_errors = cli_support.clear_errors
_settings = cli_support.settings
_runtime = cli_support.make_runtime


@click.group()
@click.version_option(package_name="pangea-session-sync")
@click.pass_context
@clear_errors
def main(ctx: click.Context) -> None:
    """Keep a web app's local sessions true to Pangea AuthN."""
    if ctx.invoked_subcommand == "check":  # `check` reports bad settings itself, as one of its lines
        logs.configure("text")
        return
    logs.configure(_settings().log_format)  # text or JSON lines on stderr, tokens scrubbed


@main.group()
def db() -> None:
    """Database schema commands."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True, help="Alembic revision to upgrade to.")
@clear_errors
def db_upgrade(revision: str) -> None:
    """Apply the migrations to DATABASE_URL."""
    from alembic.util import CommandError

    settings = _settings()
    try:
        dbmod.upgrade(settings.database_url, revision)
    except CommandError as exc:  # e.g. an unknown --revision
        raise click.ClickException(str(exc)) from None
    click.echo(f"database at revision {dbmod.current_revision(settings.database_url)}")


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8900, show_default=True, type=click.IntRange(1, 65535))
@clear_errors
def emulator(host: str, port: int) -> None:
    """Serve the Pangea AuthN emulator.

    Tokens from EMULATOR_SERVICE_TOKEN / EMULATOR_CLIENT_TOKEN (default: the development tokens
    pts_sessionsyncemulatorservicetoken2 / pcl_sessionsyncemulatorclienttoken22). The rules Pangea
    does not document: EMULATOR_ROTATION (session-id, new-refresh-id, distinct-session-id),
    EMULATOR_ACTIVE_TOKENS (opaque, jwt), EMULATOR_HTTP_CODES (e.g. ``InvalidToken=401,ExpiredToken=401``:
    the HTTP codes of its answers), and EMULATOR_MAX_LIST_SIZE / EMULATOR_MAX_FILTER_IDS (its session
    lists refuse larger requests).
    """
    from worker import emulator as emu
    from worker.emulator import faults, store

    service = os.environ.get("EMULATOR_SERVICE_TOKEN") or emu.DEFAULT_SERVICE_TOKEN
    client = os.environ.get("EMULATOR_CLIENT_TOKEN") or emu.DEFAULT_CLIENT_TOKEN
    env = os.environ
    rules = {
        "rotation": env.get("EMULATOR_ROTATION") or store.ROTATIONS[0],
        "active_tokens": env.get("EMULATOR_ACTIVE_TOKENS") or store.ACTIVE_TOKENS[0],
    }
    if rules["rotation"] not in store.ROTATIONS or rules["active_tokens"] not in store.ACTIVE_TOKENS:
        raise click.UsageError(
            f"EMULATOR_ROTATION must be one of {', '.join(store.ROTATIONS)}; "
            f"EMULATOR_ACTIVE_TOKENS one of {', '.join(store.ACTIVE_TOKENS)}"
        )
    try:
        codes = faults.http_codes_from_text(env.get("EMULATOR_HTTP_CODES", ""), "EMULATOR_HTTP_CODES")
        max_size = faults.limit_from_text(env.get("EMULATOR_MAX_LIST_SIZE", ""), "EMULATOR_MAX_LIST_SIZE")
        max_ids = faults.limit_from_text(env.get("EMULATOR_MAX_FILTER_IDS", ""), "EMULATOR_MAX_FILTER_IDS")
    except faults.BadFaults as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"AuthN emulator on http://{host}:{port} (PANGEA_BASE_URL=http://{host}:{port})", err=True)
    emu.serve(
        host=host,
        port=port,
        service_token=service,
        client_token=client,
        http_codes=codes,
        max_size=max_size,
        max_filter_ids=max_ids,
        **rules,
    )


def _print_json(data: object) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


@main.command()
@click.option("--loglevel", default="info", show_default=True)
@click.option("--pool", type=click.Choice(["solo", "prefork", "threads"]), help="Default: solo on SQLite, prefork.")
@click.option("--concurrency", type=click.IntRange(1, 256), help="Worker processes (prefork) or threads.")
@clear_errors
def worker(loglevel: str, pool: str | None, concurrency: int | None) -> None:
    """Run a Celery worker with the beat scheduler embedded (one command for small deployments)."""
    settings = _settings()
    from worker.celery import app

    pool = pool or ("solo" if settings.celery_broker_url.startswith("sqla+") else "prefork")
    # A node name of its own, so remote control and Flower tell it from an app's workers on the same broker.
    argv = ["worker", "-B", "-E", f"--loglevel={loglevel}", f"--pool={pool}", "--hostname=session-sync@%h"]
    if concurrency:
        argv.append(f"--concurrency={concurrency}")
    app.worker_main(argv)


@main.command()
@click.option(
    "--once", is_flag=True, required=True, help="Run one whole sweep now, without a broker (on --processes processes)."
)
@click.option(
    "--processes",
    type=click.IntRange(1, 64),
    help=(
        "Processes sharing the sweep. Default on PostgreSQL with a shared rate limit: the cores, up to 4"
        " and what the rate serves within half a lease; else 1."
    ),
)
@click.option("--json", "as_json", is_flag=True, help="Print the counts as JSON.")
@clear_errors
def sweep(once: bool, processes: int | None, as_json: bool) -> None:
    """Check every due session now, without a broker: for cron, or when no broker runs."""
    rt = _runtime()
    try:
        counts = operations.sweep_once(rt, processes=processes or forks.default_processes(rt.settings))
    finally:
        rt.close()
    _print_counts(counts, as_json)
    if counts.get("stopped"):
        sys.exit(checks.EXIT_TOKEN_REFUSED)


@main.command()
@click.option("--all", "everything", is_flag=True, help="Every active session (sent as batches, like a sweep).")
@click.option("--user", "user_id", help="Every active session of this Pangea user id (pui_...).")
@click.option("--session", "session_id", type=cli_support.ROW_ID, help="One local session id.")
@click.option("--wait", is_flag=True, help="Wait for the worker, show progress, and print what it did.")
@click.option("--local", is_flag=True, help="Do it in this process instead of sending it to a worker.")
@click.option(
    "--timeout",
    default="5m",
    show_default=True,
    type=cli_support.Duration(86400),
    help="How long --wait waits (30s, 5m, 1h).",
)
@click.option(
    "--confirm-revocations",
    is_flag=True,
    help="Clear a tripped mass-revocation guard and let this resync revoke what Pangea says is gone.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the counts as JSON.")
@clear_errors
def resync(
    everything: bool,
    user_id: str | None,
    session_id: int | None,
    wait: bool,
    local: bool,
    timeout: float,
    confirm_revocations: bool,
    as_json: bool,
) -> None:
    """Re-check sessions against Pangea now, whatever their schedule."""
    if sum((everything, user_id is not None, session_id is not None)) != 1:
        raise click.UsageError("say exactly one of --all, --user ID, --session ID")
    rt = _runtime()
    try:
        operations.require_known(rt, session_id=session_id, user_id=user_id)  # a typo is an error, not a no-op
        if local:
            counts = operations.resync(
                rt, session_id=session_id, user_id=user_id, confirm_revocations=confirm_revocations
            )
        else:
            results, sizes, what = _send_resync(rt, session_id, user_id, everything, confirm_revocations)
    finally:
        rt.close()
    if local:
        if counts["stopped"]:  # the one line (and exit 3) of every command whose token Pangea refused
            raise errors.OurTokenRejected("the resync stopped and changed nothing")
        _print_counts(counts, as_json)
        return
    click.echo(what, err=wait)
    if not wait:
        return
    show = (lambda line: click.echo("\r" + line, nl=False, err=True)) if sys.stderr.isatty() else None
    try:
        done = progress.wait(results, sizes, timeout=timeout, queue=rt.settings.queue, show=show)
    except errors.WaitTimeout as exc:
        if show:
            click.echo(err=True)
        click.echo(f"session-sync: timed out after {timeout:g} s: {exc}", err=True)
        sys.exit(checks.EXIT_FAILURE)
    if show:
        click.echo(err=True)
    total = _add_up(done)
    _print_counts(total, as_json)
    if total.get("stopped"):
        sys.exit(checks.EXIT_TOKEN_REFUSED)


def _send_resync(
    rt: runtime.Runtime, session_id: int | None, user_id: str | None, everything: bool, confirm: bool
) -> tuple[list[Any], list[int], str]:
    """Queue the resync: one task for a session or a user, one task per batch for --all."""
    from worker import tasks

    if not everything:
        result = tasks.resync.apply_async(
            kwargs={"session_id": session_id, "user_id": user_id, "confirm_revocations": confirm}
        )
        return [result], [1], f"resync queued as task {result.id}"
    results: list[Any] = []
    sizes: list[int] = []
    for ids in operations.resync_batches(rt):
        results.append(tasks.resync_batch.apply_async(kwargs={"session_ids": ids, "confirm_revocations": confirm}))
        sizes.append(len(ids))
    ids_shown = ", ".join(str(r.id) for r in results[:3]) + (", ..." if len(results) > 3 else "")
    return results, sizes, f"resync of {sum(sizes)} sessions queued as {len(results)} tasks: {ids_shown}"


def _add_up(results: list[Any]) -> dict[str, Any]:
    """One set of counts from the batches' counts."""
    if len(results) == 1:
        return dict(results[0])
    total: dict[str, Any] = {}
    for counts in results:
        for key, value in counts.items():
            if isinstance(value, bool):
                total[key] = total.get(key, False) or value
            elif isinstance(value, int):
                total[key] = total.get(key, 0) + value
            elif isinstance(value, dict):
                merged = total.setdefault(key, {})
                for k, v in value.items():
                    merged[k] = merged.get(k, 0) + v
    return total


@main.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object, for machines.")
@click.option("--session", "session_id", type=cli_support.ROW_ID, help="One session's state and audit trail.")
@clear_errors
def status(as_json: bool, session_id: int | None) -> None:
    """Sessions by state, due now, outbox backlog and dead letters, the last sweep."""
    rt = _runtime()
    try:
        report = operations.status(rt) if session_id is None else operations.session_report(rt, session_id)
    finally:
        rt.close()
    if report is None:
        raise click.ClickException(f"no session with id {session_id}")
    if as_json:
        _print_json(report)
    elif session_id is not None:
        _print_session(cast("SessionReport", report))
    else:
        _print_status(cast("StatusReport", report))
    last = None if session_id is not None else cast("StatusReport", report)["last_sweep"]
    if last is not None and last["stopped"]:
        sys.exit(checks.EXIT_TOKEN_REFUSED)  # the last sweep stopped: Pangea refused PANGEA_AUTHN_TOKEN


@main.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object, for machines (and health checks).")
@click.option(
    "--skip",
    "skipped",
    multiple=True,
    type=click.Choice(checks.SKIPPABLE),
    help="Do not run this check (repeatable). Readiness probes: --skip pangea.",
)
def check(as_json: bool, skipped: tuple[str, ...]) -> None:
    """Is this deployment ready? Settings, database at head, broker, rate-limit store, Pangea accepting our token.

    A readiness probe runs ``check --skip pangea``: a worker whose database and broker answer is ready,
    and it rides out a Pangea outage on its own (retries, backoff) rather than being restarted.
    """
    skip = frozenset(skipped)
    try:
        results = checks.run_all(_settings(), skip=skip)
    except errors.ConfigError as exc:
        results = [checks.Result(name="settings", ok=False, detail=str(exc), exit_code=checks.EXIT_CONFIG)]
    if as_json:
        summary: dict[str, object] = {
            "ok": all(r.ok for r in results),
            "checks": [r.as_dict() for r in results],
            "skipped": [name for name in checks.SKIPPABLE if name in skip],
        }
        try:
            summary["capabilities"] = _settings().capabilities
        except errors.ConfigError:
            pass
        _print_json(summary)
    else:
        by_name = {r.name: r for r in results}
        for name in checks.NAMES:  # one line per check, in order, a skipped one said so
            if name in skip:
                click.echo(f"skip  {name:<9} not checked (--skip {name})")
            elif (r := by_name.get(name)) is not None:
                click.echo(f"{'ok  ' if r.ok else 'FAIL'}  {r.name:<9} {r.detail}")
    failed = [r for r in results if not r.ok]
    if failed:
        sys.exit(failed[0].exit_code)


@main.command()
@click.option(
    "--deadline",
    default="50s",
    show_default=True,
    type=cli_support.Duration(3600),
    help="Give up after this long (50s, 2m).",
)
@clear_errors
def demo(deadline: float) -> None:
    """The whole product on embedded defaults: SQLite, embedded broker, built-in emulator, real worker."""
    from worker import demo as demo_mod

    if not demo_mod.run(deadline=deadline):
        sys.exit(1)


def _print_counts(counts: Mapping[str, Any], as_json: bool) -> None:
    if as_json:
        _print_json(counts)
        return
    keys = ("checked", "refreshed", "revoked", "failed", "held")
    click.echo("  ".join(f"{k}={counts.get(k, 0)}" for k in keys))
    for reason, n in sorted((counts.get("revoked_by_reason") or {}).items()):
        click.echo(f"  revoked ({reason}): {n}")
    if counts.get("stopped"):
        click.echo("STOPPED: Pangea refused PANGEA_AUTHN_TOKEN; nothing was changed", err=True)
    if counts.get("held"):
        click.echo(
            "HELD: the mass-revocation guard kept sessions Pangea called gone; see `session-sync status`",
            err=True,
        )


def _print_status(report: StatusReport) -> None:
    sessions = report["sessions"]
    click.echo("sessions   " + "  ".join(f"{k}={v}" for k, v in sessions.items()))
    click.echo(f"due now    {report['due']}   uncertain={report['uncertain']}  failing={report['failing']}")
    click.echo("outbox     " + "  ".join(f"{k}={v}" for k, v in report["outbox"].items()))
    guard_state = report["revocation_guard"]
    if guard_state["tripped"]:
        click.echo(f"REVOCATIONS HELD since {guard_state.get('tripped_at')}: {guard_state.get('reason')}")
    last = report["last_sweep"]
    if last is None:
        click.echo("last sweep never")
    else:
        click.echo(
            f"last sweep {last['slot']} ({last['kind']}): due={last['due']} checked={last['checked']} "
            f"refreshed={last['refreshed']} revoked={last['revoked']} failed={last['failed']}"
            + ("  STOPPED" if last["stopped"] else "")
        )


def _print_session(report: SessionReport) -> None:
    click.echo(f"session {report['id']}  user {report['user_id']}  {report['state']}")
    if report["end_reason"]:
        click.echo(f"ended {report['ended_at']}: {report['end_reason']}")
    click.echo(f"active token expires {report['active_expires_at']}, next check {report['next_check_at']}")
    for e in report["events"]:
        click.echo(f"  {e['at']}  {e['action']:<10} {e['outcome']:<16} {e['reason'] or '':<16} {e['request_id'] or ''}")


main.add_command(cli_outbox.logout)
main.add_command(cli_outbox.outbox)

if __name__ == "__main__":
    main()
