"""The job journal: latest state per job, bounded size, torn lines skipped."""

from __future__ import annotations

import stat
import threading

from libra_worker.journal import COMPLETE, FAIL, MAX_ERROR_CHARS, RUNNING, Journal


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


def test_a_ticket_is_written_once_when_the_job_is_not_journaled_running(tmp_path):
    journal = Journal(tmp_path / "jobs.journal")
    ticket = journal.ticket("H:1", "DISCOVER")
    assert not (tmp_path / "jobs.journal").exists() and journal.recent(5) == []

    ticket.finish(COMPLETE)

    assert (tmp_path / "jobs.journal").read_text().count("\n") == 1
    [record] = journal.recent(5)
    assert (record.handle, record.action, record.state) == ("H:1", "DISCOVER", COMPLETE)
    assert record.started <= record.finished


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


def test_the_journal_is_the_workers_own(tmp_path):
    journal = Journal(tmp_path / "jobs.journal", max_entries=1)
    journal.started("H:1", "STATS").finish(COMPLETE)  # rotates: .1 exists too
    journal.started("H:2", "STATS")

    for name in ("jobs.journal", "jobs.journal.1"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600, name


def test_a_huge_error_is_kept_to_a_bounded_prefix(tmp_path):
    journal = Journal(tmp_path / "jobs.journal")
    journal.started("H:1", "UPDATE").finish(FAIL, "x" * 5_000_000)

    [record] = journal.recent(1)
    assert len(record.hpcs_error) <= MAX_ERROR_CHARS + 40
    assert record.hpcs_error.endswith("(5000000 characters)")
    assert (tmp_path / "jobs.journal").stat().st_size < 2 * MAX_ERROR_CHARS


def test_the_journal_rotates_by_bytes_as_well_as_by_jobs(tmp_path):
    journal = Journal(tmp_path / "jobs.journal", max_entries=1000, max_bytes=20_000)
    for number in range(100):
        journal.started(f"H:{number}", "UPDATE").finish(FAIL, "e" * MAX_ERROR_CHARS)

    sizes = [path.stat().st_size for path in tmp_path.iterdir()]
    assert len(sizes) == 2 and max(sizes) < 20_000 + 2 * MAX_ERROR_CHARS, sizes
    assert journal.recent(1)[0].handle == "H:99"


def test_jobs_of_one_line_count_as_jobs_for_rotation(tmp_path):
    journal = Journal(tmp_path / "jobs.journal", max_entries=10)
    for number in range(35):
        journal.ticket(f"H:{number}", "STATS").finish(COMPLETE)

    assert 10 <= len(journal.recent(100)) <= 20


def test_a_restarted_journal_counts_the_jobs_already_written(tmp_path):
    path = tmp_path / "jobs.journal"
    first = Journal(path, max_entries=10)
    for number in range(6):
        first.started(f"H:{number}", "UPDATE").finish(COMPLETE)  # 12 lines, 6 jobs
    second = Journal(path, max_entries=10)
    for number in range(6, 10):
        second.ticket(f"H:{number}", "STATS").finish(COMPLETE)

    # The tenth job rotates the file: its 12 lines were not counted as 12 jobs.
    assert not path.exists() and len(Journal(path).recent(100)) == 10


def test_final_lines_written_while_deferred_wait_for_write_deferred(tmp_path):
    journal = Journal(tmp_path / "jobs.journal")
    with journal.deferred():
        journal.ticket("H:1", "DISCOVER").finish(COMPLETE)
        reader = journal.started("H:2", "METRICS")  # RUNNING: written at once
        other_thread = threading.Thread(
            target=lambda: journal.ticket("H:3", "STATS").finish(COMPLETE))
        other_thread.start()
        other_thread.join()
    reader.finish(COMPLETE)  # outside the block: at once
    assert [(r.handle, r.state) for r in journal.recent(5)] == [
        ("H:3", COMPLETE), ("H:2", COMPLETE)]

    journal.write_deferred()

    assert [(r.handle, r.state) for r in journal.recent(5)] == [
        ("H:3", COMPLETE), ("H:2", COMPLETE), ("H:1", COMPLETE)]
