"""Routine checks write nothing per session: groups carry the schedule, rows change only with their facts.

On SQLite and PostgreSQL, against the emulator. "Nothing written" is read from the rows themselves: every
column of every session and, on PostgreSQL, each row version's ``xmin`` (which any UPDATE changes, even
one that writes the same values), plus the audit trail's size.
"""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from tests.conftest import RunningEmulator
from tests.helpers import active_token, login_many, requests, row
from worker import models, operations, queries, runtime, sessions
from worker.counts import SyncCounts

pytestmark = pytest.mark.timeout(120)

S, G = models.LocalSession, models.CheckGroup


def snapshot(rt: runtime.Runtime) -> tuple[list[tuple[Any, ...]], int]:
    """Every session row as stored (with ``xmin`` on PostgreSQL), and how many audit events there are."""
    with rt.sessions() as db:
        columns: list[Any] = [*S.__table__.columns]
        if db.get_bind().dialect.name == "postgresql":
            columns.append(sa.literal_column("sessions.xmin::text"))
        rows = [tuple(r) for r in db.execute(sa.select(*columns).order_by(S.id))]
        events = db.execute(sa.select(sa.func.count()).select_from(models.SessionEvent)).scalar_one()
    return rows, int(events)


def on_groups(rt: runtime.Runtime, ids: list[int]) -> None:
    """The sessions' first checks (a login is checked on its own once), after which they are on their groups."""
    with rt.sessions.begin() as db:
        queries.make_due(db, now=rt.clock(), session_ids=ids)
    counts = rt.run(rt.engine.drain())
    assert counts.checked >= len(ids)
    assert all(row(rt, i).next_check_at is None for i in ids)


def groups_due_now(rt: runtime.Runtime) -> None:
    with rt.sessions.begin() as db:
        db.execute(sa.update(G).values(next_check_at=rt.clock()))


def a_round_changes(rt: runtime.Runtime, ids: list[int]) -> tuple[SyncCounts, list[int]]:
    """Every group's round, drained: its counts, and which of ``ids`` had their row changed by it."""
    before = {r[0]: r for r in snapshot(rt)[0]}
    groups_due_now(rt)
    counts = rt.run(rt.engine.drain())
    after = {r[0]: r for r in snapshot(rt)[0]}
    return counts, [sid for sid in ids if after[sid] != before[sid]]


@pytest.mark.parametrize("revalidation", ["bulk", "per_token"])
def test_a_round_of_healthy_sessions_writes_no_session_row(
    make_runtime: Any, emu: RunningEmulator, revalidation: str
) -> None:
    rt = make_runtime(SESSION_SYNC_REVALIDATION=revalidation)
    # Given healthy sessions on their groups' schedule
    ids = login_many(rt, emu, [f"calm{i}@example.com" for i in range(40)])
    on_groups(rt, ids)
    before = snapshot(rt)
    column_checked = row(rt, ids[0]).last_checked_at
    assert column_checked is not None

    # When every group's round comes round
    groups_due_now(rt)
    started = rt.clock()
    counts = rt.run(rt.engine.drain())

    # Then every session was checked with Pangea and kept, and not one session row or audit row was written
    assert (counts.checked, counts.kept, counts.revoked, counts.failed) == (40, 40, 0, 0)
    assert snapshot(rt) == before
    # ... while what the app reads says Pangea vouched for them in this round
    with rt.sessions() as db:
        found = sessions.authenticate(db, active_token(rt, ids[0]), cipher=rt.cipher)
        report = operations.session_report(rt, ids[0])
        rounds = db.execute(sa.select(G.verified_at, G.cursor_id, G.claim_token)).all()
    assert found.last_checked_at is not None and found.last_checked_at >= started > column_checked
    assert found.verified_within(timedelta(seconds=30))
    assert report is not None and report["last_checked_at"] >= started.isoformat()
    assert all(v is not None and v >= started and c is None and t is None for v, c, t in rounds)


def test_only_the_sessions_whose_facts_changed_are_written(make_runtime: Any, emu: RunningEmulator) -> None:
    rt = make_runtime()
    # Given healthy sessions on their groups, then one killed at Pangea
    ids = login_many(rt, emu, [f"some{i}@example.com" for i in range(12)])
    on_groups(rt, ids)
    killed = ids[3]
    rt.run(rt.client.session_invalidate(row(rt, killed).pangea_session_id or ""))

    # When the rounds come round
    counts, changed = a_round_changes(rt, ids)

    # Then the killed one is revoked, with its audit row, and the others are as they were
    assert (counts.checked, counts.revoked, counts.kept) == (12, 1, 11)
    assert changed == [killed]
    assert row(rt, killed).state is models.SessionState.REVOKED
    report = operations.session_report(rt, killed)
    assert report is not None and [e["action"] for e in report["events"]][:1] == ["revoked"]


def test_a_session_whose_expiry_moved_at_pangea_is_written_with_it(make_runtime: Any, emu: RunningEmulator) -> None:
    rt = make_runtime()
    # Given healthy sessions on their groups, one of which holds an expiry ten minutes short of Pangea's
    ids = login_many(rt, emu, [f"moved{i}@example.com" for i in range(6)])
    on_groups(rt, ids)
    moved = ids[2]
    pangea_expiry = row(rt, moved).active_expires_at
    with rt.sessions.begin() as db:
        db.execute(sa.update(S).where(S.id == moved).values(active_expires_at=pangea_expiry - timedelta(minutes=10)))

    # When the rounds come round (the session list tells every expiry)
    counts, changed = a_round_changes(rt, ids)

    # Then that session alone is written, with Pangea's expiry, and the change is explained
    assert (counts.checked, counts.kept, counts.revoked) == (6, 6, 0)
    assert changed == [moved]
    assert row(rt, moved).active_expires_at == pangea_expiry and row(rt, moved).next_check_at is None
    report = operations.session_report(rt, moved)
    assert report is not None and [e["action"] for e in report["events"]][:1] == ["kept"]


def test_a_round_left_half_done_resumes_at_its_cursor(make_runtime: Any, emu: RunningEmulator) -> None:
    rt = make_runtime(SESSION_SYNC_BATCH_SIZE="10", SESSION_SYNC_LEASE="30s")
    # Given forty healthy sessions in one group
    ids = login_many(rt, emu, [f"half{i}@example.com" for i in range(40)])
    on_groups(rt, ids)
    with rt.sessions.begin() as db:
        db.execute(sa.update(S).values(bucket=0))
        db.execute(sa.update(G).where(G.id != 0).values(next_check_at=rt.clock() + timedelta(hours=1)))
    groups_due_now_for = rt.clock()
    with rt.sessions.begin() as db:
        db.execute(sa.update(G).where(G.id == 0).values(next_check_at=groups_due_now_for))
        # ... and a worker that took the group's round, did two pages of ten, and died
        dead = queries.take_group(
            db,
            now=rt.clock(),
            lease=timedelta(seconds=30),
            interval=rt.policy.check_interval,
            claim_token="dead-worker",
            due_by=rt.clock(),
        )
        assert dead is not None and dead.id == 0
        page = queries.group_page(db, group=dead, cursor=dead.cursor, limit=20, now=rt.clock())
        assert queries.advance_group(
            db, dead, cursor=(page[-1].bucket, page[-1].id), now=rt.clock(), lease=timedelta(seconds=30)
        )

    # When another worker sweeps while the dead one's lease holds, then after it lapsed
    assert rt.run(rt.engine.drain()).checked == 0
    lists_before = requests(emu, "/v2/session/list")
    later = make_runtime(SESSION_SYNC_BATCH_SIZE="10")
    later.engine._clock = lambda: rt.clock() + timedelta(seconds=31)
    counts = later.run(later.engine.drain())

    # Then it checks exactly the twenty the dead worker had not done, in two pages, and closes the round
    assert counts.checked == 20
    assert requests(emu, "/v2/session/list") - lists_before == 2
    with rt.sessions() as db:
        group = db.get(G, 0)
        assert group is not None
        assert (group.cursor_id, group.claim_token, group.verified_at) == (None, None, dead.round_started_at)


def test_resync_all_writes_a_row_per_group_and_resync_user_nothing_unchanged(
    make_runtime: Any, emu: RunningEmulator
) -> None:
    rt = make_runtime()
    # Given healthy sessions on their groups, nothing due
    ids = login_many(rt, emu, [f"again{i}@example.com" for i in range(20)])
    on_groups(rt, ids)
    before = snapshot(rt)

    # When support resyncs everything, then one user
    everything = rt.run(rt.engine.resync())
    user = rt.run(rt.engine.resync(user_id=row(rt, ids[5]).user_id))

    # Then every session was checked, and no session row was written by either
    assert (everything.checked, everything.kept) == (20, 20)
    assert (user.checked, user.kept) == (1, 1)
    assert snapshot(rt) == before
    with rt.sessions() as db:
        assert all(n > rt.clock() for n in db.execute(sa.select(G.next_check_at)).scalars())


def test_a_session_that_needs_a_refresh_leaves_its_group_and_comes_back(
    make_runtime: Any, emu: RunningEmulator
) -> None:
    rt = make_runtime(SESSION_SYNC_CHECK_INTERVAL="1s")
    # Given a session with 4 s tokens (refreshed 2 to 2.5 s into their life) checked once: due for a
    # refresh only after the next interval, so it is on its group's schedule
    [sid] = login_many(rt, emu, ["short@example.com"], active_ttl=4)
    on_groups(rt, [sid])
    old = active_token(rt, sid)

    # When its group's round comes round inside the refresh margin
    time.sleep(2.6)
    groups_due_now(rt)
    counts = rt.run(rt.engine.drain())

    # Then it left its group for the refresh, was refreshed once, and is back on its group
    assert (counts.checked, counts.refreshed) == (1, 1) and active_token(rt, sid) != old
    after = row(rt, sid)
    assert after.next_check_at is None and after.claim_token is None and not after.uncertain


def test_concurrent_workers_take_disjoint_groups(make_runtime: Any, emu: RunningEmulator) -> None:
    import threading

    rt = make_runtime()
    # When four threads take due groups' rounds as fast as they can
    taken: list[list[int]] = [[] for _ in range(4)]
    barrier = threading.Barrier(4)

    def taker(n: int) -> None:
        barrier.wait()
        while True:
            with rt.sessions.begin() as db:
                got = queries.take_group(
                    db,
                    now=rt.clock(),
                    lease=timedelta(minutes=5),
                    interval=timedelta(minutes=5),
                    claim_token=f"t{n}",
                    due_by=rt.clock(),
                )
            if got is None:
                return
            taken[n].append(got.id)

    threads = [threading.Thread(target=taker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Then every group was taken exactly once
    everything = [g for part in taken for g in part]
    assert sorted(everything) == list(range(models.DEFAULT_GROUPS))


def test_a_worker_that_loses_the_race_for_a_group_takes_the_next_one(make_runtime: Any, emu: RunningEmulator) -> None:
    import threading

    rt = make_runtime()
    now = rt.clock()

    def take(db: Any, token: str) -> queries.GroupRound | None:
        return queries.take_group(
            db, now=now, lease=timedelta(minutes=5), interval=timedelta(minutes=5), claim_token=token, due_by=now
        )

    # Given a worker that has leased the first due group and not yet committed
    first = rt.sessions()
    first.begin()
    mine = take(first, "first")
    assert mine is not None
    # And a second worker choosing while that lease is uncommitted (it sees the same first group due)
    theirs: list[queries.GroupRound | None] = []
    racing = threading.Thread(target=lambda: theirs.append(_take_in_own_transaction(rt, take)))
    racing.start()
    _wait_until_blocked_or_done(rt, racing)
    # When the first worker commits
    first.commit()
    first.close()
    racing.join(timeout=30)
    # Then the second worker leased another due group instead of concluding nothing was due
    # (a sweep lane that took "nothing" stopped, and its worker swept on fewer lanes than configured)
    assert theirs and theirs[0] is not None, "the second worker took no group though 31 were due"
    assert theirs[0].id != mine.id


def test_a_large_group_gone_round_is_taken_alone_before_one_never_gone_round(
    make_runtime: Any, emu: RunningEmulator
) -> None:
    rt = make_runtime()
    now = rt.clock()
    with rt.sessions.begin() as db:
        # Given groups that have never gone round (their sizes unknown), all due
        db.execute(sa.update(G).values(verified_at=None, sessions=0, next_check_at=now))
        # And, due before them, a group whose last round held far more sessions than a batch
        db.execute(
            sa.update(G)
            .where(G.id == 0)
            .values(verified_at=now - timedelta(minutes=5), sessions=5000, next_check_at=now - timedelta(minutes=1))
        )
    # When a worker takes a batch's worth of groups
    with rt.sessions.begin() as db:
        taken = queries.take_groups(
            db,
            now=now,
            lease=timedelta(minutes=5),
            interval=timedelta(minutes=5),
            claim_token="mixed",
            due_by=now,
            sessions=1000,
        )
    # Then it takes the large group alone: the batch is full (nothing more is counted or taken)
    assert [g.id for g in taken] == [0]


def _take_in_own_transaction(rt: runtime.Runtime, take: Any) -> queries.GroupRound | None:
    with rt.sessions.begin() as db:
        return take(db, "second")  # type: ignore[no-any-return]


def _wait_until_blocked_or_done(rt: runtime.Runtime, thread: Any) -> None:
    """Until the thread waits on a row lock (PostgreSQL) or on SQLite's write lock (a moment)."""
    deadline = time.monotonic() + 10
    with rt.sessions() as db:
        postgres = db.get_bind().dialect.name == "postgresql"
    while thread.is_alive() and time.monotonic() < deadline:
        if not postgres:
            time.sleep(0.3)
            return
        with rt.sessions() as db:
            waiting = db.execute(
                sa.text(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE wait_event_type = 'Lock' AND datname = current_database()"
                )
            ).scalar_one()
        if waiting:
            return
        time.sleep(0.02)


def test_the_staleness_policy_reads_the_groups_verification(make_runtime: Any, emu: RunningEmulator) -> None:
    rt = make_runtime(SESSION_SYNC_STALE_POLICY="revoke", SESSION_SYNC_MAX_UNVERIFIED="1h")
    # Given two sessions on their groups, both with a row record from three hours ago: Pangea vouched
    # for one of them through its group's round ten minutes ago, for the other's group never since
    vouched, stale = login_many(rt, emu, ["vouched@example.com", "stale@example.com"])
    now = rt.clock()
    with rt.sessions.begin() as db:
        db.execute(sa.update(S).values(last_checked_at=now - timedelta(hours=3), next_check_at=None))
        db.execute(sa.update(S).where(S.id == vouched).values(bucket=0))
        db.execute(sa.update(S).where(S.id == stale).values(bucket=1023))
        db.execute(sa.update(G).where(G.lo == 0).values(verified_at=now - timedelta(minutes=10)))
        db.execute(sa.update(G).where(G.lo != 0).values(verified_at=now - timedelta(hours=2)))
    # When Pangea is down during a resync (fail-closed)
    emu.admin.faults(error_rate=1.0, error="InternalError")
    rt.run(rt.engine.resync())
    emu.admin.clear_faults()
    # Then only the session nobody vouched for within the hour is revoked as unverifiable
    assert row(rt, vouched).state is models.SessionState.ACTIVE
    assert (row(rt, stale).state, row(rt, stale).end_reason) == (models.SessionState.REVOKED, "unverifiable")
