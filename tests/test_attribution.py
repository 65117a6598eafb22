"""The attribution rule on its own, apart from the network: hand-made cases for each verdict,
and hypothesis timelines (our submits, one lost answer that did or did not create a task,
another program's tasks, a lagging or half-read task list, unrelated server and client clocks)
checked against the truth the timeline knows and the rule does not."""

from __future__ import annotations

import datetime as dt

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from emo_async._batch._attribution import (
    Evidence,
    Flight,
    ListedTask,
    LostSubmit,
    OwnTask,
    Verdict,
    decide,
    durations_match,
)

T0 = dt.datetime(2026, 12, 6, 12, 0, tzinfo=dt.UTC)
OFF = dt.timedelta(hours=8, seconds=3)  # the server's clock is far from ours: no matter


def at(s: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=s)


def srv(s: float) -> dt.datetime:
    return at(s) + OFF


def own(task_id: str, sent: float, answered: float) -> OwnTask:
    return OwnTask(task_id, sent_at=at(sent), answered_at=at(answered))


def listed(task_id: str, created: float, dur: float | None = 3.5, status: str = "SUCCEEDED"):
    return ListedTask(task_id, srv(created), status, video_duration=dur, video_ratio="1:1")


LOST = LostSubmit("job", sent_at=at(10), failed_at=at(12), audio_seconds=3.5, ratio="1:1")
BEFORE = own("b", 5, 5.2)
AFTER = own("a", 20, 20.2)


def evidence(*items: ListedTask, owns=(BEFORE, AFTER), reached_end=False, complete=-100.0):
    return Evidence(
        own={o.task_id: o for o in owns},
        listed=items,
        complete_after=srv(complete) if complete is not None else None,
        reached_end=reached_end,
    )


class TestRivalsOfOurOwn:
    """A task that may be another of our submits' is never adopted (issue 17 break attempts)."""

    EV = evidence(listed("b", 5.1), listed("x", 11), listed("a", 20.1))

    def test_a_post_still_out_that_may_have_made_it_holds_the_adoption(self) -> None:
        assert decide([LOST], self.EV)["job"].verdict == Verdict.ADOPT
        out = Flight(at(10.5), audio_seconds=3.5, ratio="1:1")
        d = decide([LOST], self.EV, flights=[out])["job"]
        assert d.verdict == Verdict.WAIT
        assert "another submit of ours, unsettled" in d.reason

    def test_a_post_out_that_cannot_have_made_it_does_not(self) -> None:
        sent_later = Flight(at(15), audio_seconds=3.5, ratio="1:1")  # after x was created
        other_audio = Flight(at(10.5), audio_seconds=5.0, ratio="1:1")
        d = decide([LOST], self.EV, flights=[sent_later, other_audio])["job"]
        assert (d.verdict, d.task_id) == (Verdict.ADOPT, "x")

    def test_an_unresolved_submits_candidate_is_not_adopted(self) -> None:
        late = attrs.evolve(LOST, patience_over=True)
        d = decide([late], self.EV, reserved={"x": {"other-job"}})["job"]
        assert d.verdict == Verdict.UNRESOLVED
        assert [c.task_id for c in d.candidates] == ["x"]
        # The job's own candidate, from an earlier run, does not stand against it.
        d = decide([late], self.EV, reserved={"x": {"job"}})["job"]
        assert (d.verdict, d.task_id) == (Verdict.ADOPT, "x")

    def test_a_post_out_past_patience_ends_unresolved_not_waiting(self) -> None:
        out = Flight(at(10.5), audio_seconds=3.5, ratio="1:1")
        d = decide([attrs.evolve(LOST, patience_over=True)], self.EV, flights=[out])["job"]
        assert d.verdict == Verdict.UNRESOLVED
        assert [c.task_id for c in d.candidates] == ["x"]

    def test_an_unresolved_submit_keeps_the_tasks_of_its_whole_proof_window(self) -> None:
        # "y" was created after our clock says the task could be (failed at 12 + settle 2,
        # server offset known from b and a), yet before the later witness: not this job's by
        # its duration either, but nothing rules it out, and its video is kept.
        ev = evidence(listed("b", 5.1), listed("y", 18, dur=3.6), listed("a", 20.1))
        d = decide([attrs.evolve(LOST, patience_over=True)], ev)["job"]
        assert d.verdict == Verdict.UNRESOLVED
        assert [c.task_id for c in d.candidates] == ["y"]


class TestVerdicts:
    """Each verdict, from a small hand-made sweep."""

    def test_empty_covered_window_proves_absence(self) -> None:
        """Witnesses on both sides and nothing between them: resend."""
        d = decide([LOST], evidence(listed("b", 5.1), listed("a", 20.1)))["job"]
        assert d.verdict == Verdict.RESEND

    def test_empty_list_proves_nothing(self) -> None:
        """A list that shows none of our tasks cannot prove absence: wait, then unresolved."""
        ev = evidence()
        assert decide([LOST], ev)["job"].verdict == Verdict.WAIT
        late = LostSubmit("job", at(10), at(12), 3.5, "1:1", patience_over=True)
        assert decide([late], ev)["job"].verdict == Verdict.UNRESOLVED

    def test_no_later_witness_means_wait(self) -> None:
        """The first submit of a run, the list empty after it: wait for a later submit."""
        ev = evidence(listed("b", 5.1), owns=(BEFORE,))
        assert decide([LOST], ev)["job"].verdict == Verdict.WAIT

    def test_unique_matching_candidate_is_adopted(self) -> None:
        """One unknown task in the window, billed the job's duration: ours."""
        ev = evidence(listed("b", 5.1), listed("x", 11), listed("a", 20.1))
        d = decide([LOST], ev)["job"]
        assert (d.verdict, d.task_id) == (Verdict.ADOPT, "x")

    def test_clearly_mismatching_task_is_released(self) -> None:
        """Another program's clip (3.9 s) in the window of a 3.5 s job: not ours; with the
        window covered, nothing else in it: the job's POST provably created nothing."""
        ev = evidence(listed("b", 5.1), listed("x", 11, dur=3.9), listed("a", 20.1))
        d = decide([LOST], ev)["job"]
        assert d.verdict == Verdict.RESEND
        assert d.candidates == ()

    def test_task_near_the_tolerance_stays_unexplained(self) -> None:
        """3.6 s for a 3.5 s job: no match (0.02 s), not clearly other (0.15 s): no resend,
        and kept as a candidate (its video may be ours)."""
        ev = evidence(listed("b", 5.1), listed("x", 11, dur=3.6), listed("a", 20.1))
        d = decide([LOST], ev)["job"]
        assert d.verdict == Verdict.UNRESOLVED
        assert [c.task_id for c in d.candidates] == ["x"]

    def test_other_ratio_is_released(self) -> None:
        """A 3:4 video is not a 1:1 job's, whatever its length."""
        x = ListedTask("x", srv(11), "SUCCEEDED", video_duration=3.5, video_ratio="3:4")
        ev = evidence(listed("b", 5.1), x, listed("a", 20.1))
        assert decide([LOST], ev)["job"].verdict == Verdict.RESEND

    def test_two_matching_candidates_are_unresolved_and_kept(self) -> None:
        """Two tasks that both fit: no guess, both kept as candidates."""
        ev = evidence(listed("b", 5.1), listed("x", 11), listed("y", 11.5), listed("a", 20.1))
        d = decide([LOST], ev)["job"]
        assert d.verdict == Verdict.UNRESOLVED
        assert {c.task_id for c in d.candidates} == {"x", "y"}

    def test_running_candidate_means_wait(self) -> None:
        """A candidate still running may be ours: its billed duration will tell."""
        ev = evidence(
            listed("b", 5.1), listed("x", 11, dur=None, status="RUNNING"), listed("a", 20.1)
        )
        assert decide([LOST], ev)["job"].verdict == Verdict.WAIT

    def test_a_missing_task_of_ours_inside_the_window_blocks_resend(self) -> None:
        """Our own task between the witnesses is missing: the list has holes, prove nothing."""
        mid = own("m", 15, 15.2)
        ev = evidence(listed("b", 5.1), listed("a", 20.1), owns=(BEFORE, mid, AFTER))
        d = decide([LOST], ev)["job"]
        assert d.verdict == Verdict.WAIT

    def test_list_not_read_down_to_the_window_proves_nothing(self) -> None:
        """Paging stopped before the window's start: no proof."""
        ev = evidence(listed("b", 5.1), listed("a", 20.1), complete=8)
        assert decide([LOST], ev)["job"].verdict == Verdict.WAIT

    def test_after_witness_must_be_sent_after_the_settling_delay(self) -> None:
        """A submit sent right after the failure does not bound a task created late."""
        soon = own("a", 12.5, 12.7)
        ev = evidence(listed("b", 5.1), listed("a", 12.6), owns=(BEFORE, soon))
        assert decide([LOST], ev)["job"].verdict == Verdict.WAIT

    def test_two_lost_submits_competing_for_one_task(self) -> None:
        """One task fits two lost submits of the same duration: neither adopts it."""
        other = LostSubmit("job2", at(10.5), at(12.5), 3.5, "1:1")
        ev = evidence(listed("b", 5.1), listed("x", 11), listed("a", 20.1))
        got = decide([LOST, other], ev)
        assert got["job"].verdict == got["job2"].verdict == Verdict.UNRESOLVED

    def test_two_lost_submits_paired_by_duration(self) -> None:
        """Two lost submits, two tasks of different durations: each adopts its own."""
        other = LostSubmit("job2", at(10.5), at(12.5), 5.0, "1:1")
        ev = evidence(listed("b", 5.1), listed("x", 11), listed("y", 11.2, 5.0), listed("a", 20.1))
        got = decide([LOST, other], ev)
        assert (got["job"].task_id, got["job2"].task_id) == ("x", "y")

    def test_unknown_audio_duration_never_adopts(self) -> None:
        """A remote audio URL: one task in the window is still not proof it is ours."""
        blind = LostSubmit("job", at(10), at(12), None)
        ev = evidence(listed("b", 5.1), listed("x", 11), listed("a", 20.1))
        d = decide([blind], ev)["job"]
        assert d.verdict == Verdict.UNRESOLVED
        assert [c.task_id for c in d.candidates] == ["x"]

    def test_reached_end_replaces_the_before_witness(self) -> None:
        """The first submit of a fresh account: the whole list read to its end is coverage."""
        ev = evidence(listed("a", 20.1), owns=(AFTER,), reached_end=True, complete=None)
        assert decide([LOST], ev)["job"].verdict == Verdict.RESEND

    @pytest.mark.parametrize(
        ("billed", "audio", "ok"),
        [(3.5, 3.5, True), (3.515, 3.5, True), (3.53, 3.5, False), (30.15, 30.0, True)],
    )
    def test_duration_tolerance(self, billed: float, audio: float, ok: bool) -> None:
        """0.02 s or 0.5 %, whichever is larger."""
        assert durations_match(billed, audio) is ok

    def test_ratio_mismatch_is_no_match(self) -> None:
        """A 3:4 video is not a 1:1 job's, whatever its length."""
        assert not durations_match(3.5, 3.5, billed_ratio="3:4", ratio="1:1")


# -- timelines -------------------------------------------------------------------------------


@st.composite
def timelines(draw: st.DrawFn):  # type: ignore[no-untyped-def]
    offset = dt.timedelta(seconds=draw(st.floats(-50_000, 50_000)))

    def server(local: float, lag: float) -> dt.datetime:
        return at(local) + offset + dt.timedelta(seconds=lag)

    owns: list[OwnTask] = []
    created: dict[str, dt.datetime] = {}
    durations: dict[str, float] = {}
    t = 0.0
    for i in range(draw(st.integers(0, 6))):
        t += draw(st.floats(0.1, 8))
        rtt = draw(st.floats(0.01, 2))
        tid = f"own{i}"
        owns.append(OwnTask(tid, sent_at=at(t), answered_at=at(t + rtt)))
        created[tid] = server(t, draw(st.floats(0, rtt)))
        durations[tid] = draw(st.floats(1, 20))
    sent = draw(st.floats(-5, t + 10))
    failed = sent + draw(st.floats(0.01, 5))
    audio = draw(st.floats(1, 20))
    made = draw(st.booleans())
    if made:
        # Created while the request was with the server, possibly after we gave up.
        created["true"] = server(sent, draw(st.floats(0, failed - sent + 2)))
        durations["true"] = audio + draw(st.floats(-0.015, 0.015))
    for i in range(draw(st.integers(0, 6))):
        tid = f"foreign{i}"
        created[tid] = server(draw(st.floats(-10, t + 20)), 0)
        durations[tid] = draw(st.one_of(st.just(audio), st.floats(1, 20)))
    # After our submit, later submits of ours may witness it.
    for i in range(draw(st.integers(0, 3))):
        s = failed + draw(st.floats(0, 10))
        tid = f"later{i}"
        owns.append(OwnTask(tid, sent_at=at(s), answered_at=at(s + 0.1)))
        created[tid] = server(s, 0.05)
        durations[tid] = 3.0
    # The list: an index that lags (hides the newest), pages read down to some point, and
    # tasks still running.
    newest = max(created.values(), default=at(0) + offset)
    lag = dt.timedelta(seconds=draw(st.floats(0, 30)))
    hide_after = newest - lag if draw(st.booleans()) else None
    read_down_to = newest - dt.timedelta(seconds=draw(st.floats(0, 60)))
    reached_end = draw(st.booleans())
    visible = []
    for tid, c in created.items():
        if hide_after is not None and c > hide_after:
            continue
        if not reached_end and c < read_down_to and draw(st.booleans()):
            continue  # below where the pages were read: may or may not be there
        running = draw(st.integers(0, 9)) == 0
        visible.append(
            ListedTask(
                tid,
                c,
                "RUNNING" if running else "SUCCEEDED",
                video_duration=None if running else durations[tid],
                video_ratio=None if running else "1:1",
            )
        )
    ev = Evidence(
        own={o.task_id: o for o in owns},
        listed=visible,
        complete_after=None if reached_end else read_down_to,
        reached_end=reached_end,
    )
    lost = LostSubmit("job", at(sent), at(failed), audio, "1:1", patience_over=draw(st.booleans()))
    return lost, ev, made


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(timelines())
def test_never_resends_a_task_that_exists(case) -> None:  # type: ignore[no-untyped-def]
    """Whatever the list hides or the clocks say: a resend only when nothing was created."""
    lost, ev, made = case
    d = decide([lost], ev)["job"]
    if d.verdict == Verdict.RESEND:
        assert not made, d.reason


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(timelines())
def test_never_adopts_another_task_when_ours_is_visible(case) -> None:  # type: ignore[no-untyped-def]
    """When our task is in the list, a stranger is never adopted in its place."""
    lost, ev, made = case
    d = decide([lost], ev)["job"]
    visible = {t.task_id for t in ev.listed}
    if made and "true" in visible and d.verdict == Verdict.ADOPT:
        assert d.task_id == "true", d.reason


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(timelines())
def test_adoption_needs_a_finished_matching_task(case) -> None:  # type: ignore[no-untyped-def]
    """An adopted task is finished, unknown to us and billed the job's duration."""
    lost, ev, _made = case
    d = decide([lost], ev)["job"]
    if d.verdict == Verdict.ADOPT:
        t = next(t for t in ev.listed if t.task_id == d.task_id)
        assert t.task_id not in ev.own
        assert t.finished
        assert durations_match(t.video_duration, lost.audio_seconds)
    if d.verdict != Verdict.WAIT:
        # Nothing still running in the window was left behind.
        assert d.reason
