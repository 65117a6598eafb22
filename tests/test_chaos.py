"""Every fault at once, against the simulator: nothing lost, nothing billed twice, every file
exact. Checked from the simulator's ledger and the disk, never from what the client says.

The same workload runs fault-free first (the yardstick for the request count), then under the
chaos schedule of ``benchmarks/chaos.py``: 10 % ambiguous submits (the task is created, the
answer lost), 10 % 5xx on submit, task queries, the task list, detection and uploads, 429
bursts with and without ``Retry-After``, connection resets on queries, 30 % of downloads cut
at a random offset, objects rewritten under the downloader (new ETag), ignored ``Range``
headers and slow answers. ``python -m benchmarks.chaos --jobs 1000`` runs it at scale.
"""

from __future__ import annotations

from collections import Counter

import pytest

from benchmarks.chaos import FAULT_KINDS, Comparison, compare, problems
from emo_async import OutcomeState

pytestmark = [pytest.mark.anyio, pytest.mark.chaos]

JOBS = 80
SEED = 20251125
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
    """A batch under every fault at once keeps every promise the fault-free one does."""

    async def test_fault_free_run_is_clean(self, runs: Comparison) -> None:
        clean = runs.clean
        assert problems(clean) == []
        assert clean.count(OutcomeState.DONE) == JOBS
        assert clean.faults == {}

    async def test_every_fault_kind_was_injected(self, runs: Comparison) -> None:
        chaos = runs.chaos
        missing = [kind for kind in FAULT_KINDS if not chaos.faults.get(kind)]
        assert missing == [], chaos.faults
        assert chaos.throttled_with_retry_after > 0
        assert chaos.throttled_without_retry_after > 0

    async def test_every_job_ends_exactly_once(self, runs: Comparison) -> None:
        chaos = runs.chaos
        assert len(chaos.outcomes) == JOBS
        expected = Counter(f"clip-{i + 1:04d}" for i in range(JOBS))
        assert chaos.names_seen == expected
        not_done = [
            (o.job.display_name, o.state.value, o.error)
            for o in chaos.outcomes
            if o.state != OutcomeState.DONE
        ]
        # The default retry policy rides out these faults: nothing may end failed.
        assert not_done == []

    async def test_no_task_is_billed_twice_or_orphaned(self, runs: Comparison) -> None:
        chaos = runs.chaos
        assert chaos.duplicates == {}
        assert chaos.tasks_created == JOBS
        assert {o.task_id for o in chaos.outcomes} == chaos.task_ids

    async def test_every_file_is_byte_exact_and_no_part_is_left(self, runs: Comparison) -> None:
        chaos = runs.chaos
        assert chaos.bad_files == ()
        assert chaos.parts_left == ()
        assert all(o.path is not None and o.path.parent.name == "out-chaos" for o in chaos.outcomes)
        assert len({o.path for o in chaos.outcomes}) == JOBS

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
        assert problems(runs.chaos) == []
