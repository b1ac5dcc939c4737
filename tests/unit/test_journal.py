"""The job journal: latest state per job, bounded size, torn lines skipped."""

from __future__ import annotations

from libra_worker.journal import COMPLETE, FAIL, RUNNING, Journal


def test_a_job_shows_its_latest_state(tmp_path):
    journal = Journal(tmp_path / "jobs.journal")
    ticket = journal.started("H:1", "UPDATE")
    assert [(r.handle, r.state) for r in journal.recent(5)] == [("H:1", RUNNING)]

    ticket.finish(FAIL, "bad")

    [record] = journal.recent(5)
    assert (record.state, record.hpcs_error, record.action) == (FAIL, "bad", "UPDATE")
    assert record.duration_ms is not None and record.duration_ms >= 0


def test_a_killed_worker_leaves_its_job_running(tmp_path):
    Journal(tmp_path / "jobs.journal").started("H:9", "UPDATE")  # never finished

    assert [r.state for r in Journal(tmp_path / "jobs.journal").recent(5)] == [RUNNING]


def test_the_journal_keeps_between_max_and_twice_max_jobs(tmp_path):
    journal = Journal(tmp_path / "jobs.journal", max_entries=10)
    for number in range(35):
        journal.started(f"H:{number}", "STATS").finish(COMPLETE)

    kept = [r.handle for r in journal.recent(100)]
    assert 10 <= len(kept) <= 20
    assert kept[-1] == "H:34" and kept == sorted(kept, key=lambda h: int(h[2:]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["jobs.journal", "jobs.journal.1"]


def test_recent_returns_the_newest_in_order(tmp_path):
    journal = Journal(tmp_path / "jobs.journal")
    for number in range(5):
        journal.started(f"H:{number}", "STATS").finish(COMPLETE)

    assert [r.handle for r in journal.recent(2)] == ["H:3", "H:4"]


def test_a_torn_line_is_skipped(tmp_path):
    path = tmp_path / "jobs.journal"
    Journal(path).started("H:1", "STATS").finish(COMPLETE)
    with open(path, "a") as handle:
        handle.write('{"handle": "H:2", "act')

    assert [r.handle for r in Journal(path).recent(5)] == ["H:1"]
