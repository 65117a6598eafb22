"""Every fault at once, against the simulator: nothing billed twice, no job given another's
video, no paid video lost, every file exact. Checked from the simulator's ledger and the disk,
never from what the client says.

The same workload runs fault-free first (the yardstick for the request count), then under the
chaos schedule of ``benchmarks/chaos.py``: 10 % of submit answers lost after the task exists,
5 % lost before any task exists, a task list whose time filter reads UTC+8, another program
billing a task on the same key every 0.3 s, 10 % 5xx on submit, task queries, the task list,
detection and uploads, 429 bursts with and without ``Retry-After``, connection resets on
queries, 30 % of downloads cut at a random offset, objects rewritten under the downloader (new
ETag), ignored ``Range`` headers and slow answers. A lost answer is resent only on proof that
no task exists and adopted only on proof that the task is the job's; otherwise the job ends
unresolved (maybe billed, never resent) and the videos that may be its are kept in
``.unattributed/``. ``python -m benchmarks.chaos --jobs 1000`` runs it at scale.
"""

from __future__ import annotations

from collections import Counter

import pytest

from benchmarks.chaos import (
    ALLOWED_STATES,
    FAULT_KINDS,
    MIN_DONE_SHARE,
    Comparison,
    compare,
    problems,
)
from emo_async import OutcomeState

pytestmark = [pytest.mark.anyio, pytest.mark.chaos]

JOBS = 80
SEED = 20251125
#: Share of jobs that must end done at this size. The benchmark requires MIN_DONE_SHARE (90 %)
#: at 1,000 jobs; 80 jobs see a handful of lost answers, and whether another program's task
#: falls in a lost answer's window (which makes it unresolved) moves this by several points.
CI_MIN_DONE_SHARE = MIN_DONE_SHARE - 0.10
#: Requests under chaos may be at most this many times those of the fault-free run (the last
#: measured factor is in RELIABILITY.md; about 1.3).
MAX_REQUEST_FACTOR = 2.0


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


#: Base phase of the fault schedule in this test (the benchmark's is 3 s): the whole schedule,
#: bursts with and without ``Retry-After``, must come round within a run this small, which
#: takes only a few seconds now that throttled rates recover quickly.
BASE_SECONDS = 0.5


@pytest.fixture(scope="module")
async def runs(tmp_path_factory: pytest.TempPathFactory) -> Comparison:
    """The fault-free and the chaos run of one seeded workload (run once for the module)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("benchmarks.chaos.BASE_SECONDS", BASE_SECONDS)
        return await compare(tmp_path_factory.mktemp("chaos"), JOBS, seed=SEED)


class TestChaos:
    """A batch under every fault at once keeps every promise the fault-free one does, except
    that a job whose answer was lost and could not be settled ends unresolved."""

    async def test_fault_free_run_is_clean(self, runs: Comparison) -> None:
        clean = runs.clean
        assert problems(clean, min_done=1.0) == []
        assert clean.count(OutcomeState.DONE) == JOBS
        assert clean.faults == {}
        assert clean.foreign == frozenset()
        assert len(clean.ours) == clean.billed_jobs == JOBS
        assert clean.kept == frozenset()
        assert clean.lost_answers == clean.count(OutcomeState.UNRESOLVED) == 0

    async def test_every_fault_kind_was_injected(self, runs: Comparison) -> None:
        chaos = runs.chaos
        missing = [kind for kind in FAULT_KINDS if not chaos.faults.get(kind)]
        assert missing == [], chaos.faults
        assert chaos.throttled_with_retry_after > 0
        assert chaos.throttled_without_retry_after > 0
        # The other program billed tasks on the same key while the batch ran.
        assert len(chaos.foreign) >= 3

    async def test_every_job_ends_exactly_once_done_or_unresolved(self, runs: Comparison) -> None:
        chaos = runs.chaos
        assert len(chaos.outcomes) == JOBS
        expected = Counter(f"clip-{i + 1:04d}" for i in range(JOBS))
        assert chaos.names_seen == expected
        # Nothing here is a job's own fault: the retry policy rides out the transient faults,
        # and a lost answer is settled or left unresolved, never failed.
        odd = [(o.job.display_name, o.state.value, o.error) for o in chaos.outcomes]
        assert [row for row in odd if OutcomeState(row[1]) not in ALLOWED_STATES] == []
        assert all(
            o.error is not None and o.task_id is None
            for o in chaos.outcomes
            if o.state == OutcomeState.UNRESOLVED
        )
        # Only a submit whose answer told nothing may leave a job unresolved.
        assert chaos.count(OutcomeState.UNRESOLVED) <= chaos.lost_answers
        assert chaos.done_share >= CI_MIN_DONE_SHARE, chaos.unresolved_reasons()

    async def test_no_job_is_billed_twice(self, runs: Comparison) -> None:
        chaos = runs.chaos
        assert chaos.duplicates == {}
        assert {name: n for name, n in chaos.tasks_per_job.items() if n > 1} == {}
        assert chaos.orphans == ()
        # Answers lost before a task existed billed nothing, a resend after proof of absence
        # billed one: the tasks of ours are exactly the billed jobs, at most one each.
        assert len(chaos.ours) == chaos.billed_jobs <= JOBS
        assert len(chaos.ours) <= len(chaos.task_ids)
        done = [o for o in chaos.outcomes if o.state == OutcomeState.DONE]
        assert len({o.task_id for o in done}) == len(done)
        assert {o.task_id for o in done} <= chaos.ours
        assert {o.job.display_name for o in done} <= set(chaos.tasks_per_job)
        # Only an unresolved job may have been billed without getting its video.
        assert chaos.billed_jobs - len(done) <= chaos.count(OutcomeState.UNRESOLVED)

    async def test_no_file_holds_another_jobs_video(self, runs: Comparison) -> None:
        assert runs.chaos.misattributed == ()
        assert runs.clean.misattributed == ()

    async def test_no_paid_video_is_lost(self, runs: Comparison) -> None:
        chaos = runs.chaos
        assert chaos.paid_lost == ()
        # What is kept is never a video a job already holds, nor the other program's only.
        done_ids = {o.task_id for o in chaos.outcomes if o.state == OutcomeState.DONE}
        assert chaos.kept.isdisjoint(done_ids)

    async def test_every_file_is_byte_exact_and_no_part_is_left(self, runs: Comparison) -> None:
        chaos = runs.chaos
        assert chaos.bad_files == ()
        assert chaos.parts_left == ()
        done = [o for o in chaos.outcomes if o.state == OutcomeState.DONE]
        assert all(o.path is not None and o.path.parent.name == "out-chaos" for o in done)
        assert len({o.path for o in done}) == len(done)

    async def test_key_never_leaves_the_api_host(self, runs: Comparison) -> None:
        assert runs.chaos.auth_leaks == 0
        assert runs.clean.auth_leaks == 0

    async def test_requests_stay_within_a_small_factor_of_the_fault_free_run(
        self, runs: Comparison
    ) -> None:
        factor = runs.request_factor
        assert factor <= MAX_REQUEST_FACTOR, (runs.clean.by_endpoint, runs.chaos.by_endpoint)
        # Billed requests: one per job, plus only the resends the ledger proved necessary.
        assert runs.chaos.by_endpoint["submit"] <= 1.5 * JOBS

    async def test_all_promises_hold_together(self, runs: Comparison) -> None:
        assert problems(runs.chaos, min_done=CI_MIN_DONE_SHARE) == []
