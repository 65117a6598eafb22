"""Who owns a task whose submit answer was lost: the decision, with no I/O.

A billed POST whose answer never came may or may not have created a task. The account's task
list is the only evidence, and it cannot say who created a task. The rule:

* **Resend only on proof of absence.** The list must cover the submit's window — a task of
  ours answered before the POST was sent, and one sent after we gave up (plus a settling
  delay), both visible, with every task of ours between them visible too — and show no task
  in that window we cannot account for. Time bounds come from those witnesses' own
  ``gmt_create`` epochs, so the list's time-filter zone and our clock play no part.
* **Adopt only on proof of identity.** A candidate lies in the window, is no task of ours,
  has finished, and its billed duration (and ratio) matches the job's audio; and it is the
  only such candidate for this submit, and this submit the only lost one it matches.
* Otherwise **wait** (a candidate is still running, or no later task of ours has yet bounded
  the window), and once waiting can change nothing, **unresolved**: never resent, the
  candidates that may be ours named so their videos are kept.

Times: ``sent_at``/``failed_at``/``answered_at`` are our clock; ``created_at`` is the
server's. They are related only through our own tasks (each was created between its send and
its answer), never assumed equal.
"""

from __future__ import annotations

import datetime as _dt
import enum
from collections.abc import Collection, Iterable, Mapping, Sequence

import attrs

from .._owned import OwnTask

__all__ = [
    "Decision",
    "Evidence",
    "Flight",
    "ListedTask",
    "LostSubmit",
    "OwnTask",
    "Verdict",
    "clearly_not_for",
    "decide",
    "durations_match",
    "to_query",
]

#: Billed seconds may differ from our measurement of the audio by this much (absolute) …
DURATION_SLACK = 0.02
#: … or this fraction of it, whichever is larger (a narrow match: a wider one lets another
#: program's clip pass for ours more often).
DURATION_FRACTION = 0.005
#: A finished task billed further than this from the job's audio (absolute, or the fraction,
#: whichever is larger) is clearly not the job's. Between the two bounds a task is neither
#: adopted nor released: it stays a candidate, and its video is kept.
RELEASE_SLACK = 0.15
RELEASE_FRACTION = 0.03

_FINISHED = frozenset({"SUCCEEDED", "FAILED", "CANCELED", "UNKNOWN"})


class Verdict(enum.StrEnum):
    """What to do with one lost submit."""

    ADOPT = "adopt"  # the task is ours: track it
    RESEND = "resend"  # provably nothing was created: send the POST again
    WAIT = "wait"  # not decidable yet; decide again later
    UNRESOLVED = "unresolved"  # nothing proves either way: never resend, keep the candidates


@attrs.frozen
class ListedTask:
    """A task as the task list (and, once finished, a task query) shows it.

    Attributes:
        task_id: The task.
        created_at: ``gmt_create`` (the server's clock), if the list gave one.
        status: Its status as a string (``"SUCCEEDED"`` …).
        video_duration: Billed seconds, once finished and queried.
        video_ratio: ``"1:1"`` or ``"3:4"``, once finished and queried.
    """

    task_id: str
    created_at: _dt.datetime | None
    status: str
    video_duration: float | None = None
    video_ratio: str | None = None

    @property
    def finished(self) -> bool:
        if self.status == "SUCCEEDED":
            return self.video_duration is not None
        return self.status in _FINISHED


@attrs.frozen
class LostSubmit:
    """A submit whose answer was lost.

    Attributes:
        key: The job's key.
        sent_at: When the POST went out (our clock); for an intent resumed from a journal,
            when the intent was recorded.
        failed_at: When we gave up on its answer (our clock); for a resumed intent, when this
            run started.
        audio_seconds: The job's audio duration, which emo-v1 bills; None when unknown (a
            remote audio URL), which makes adoption impossible.
        ratio: The job's ratio, if known.
        patience_over: True once waiting for a later witness can no longer help (its wait
            ran out, or no further submit will come): decide with what there is.
    """

    key: str
    sent_at: _dt.datetime
    failed_at: _dt.datetime
    audio_seconds: float | None
    ratio: str | None = None
    patience_over: bool = False


@attrs.frozen
class Flight:
    """A billed POST of ours that is out: sent, neither answered nor given up on yet.

    Its task may already be in the list, a stranger until its answer comes: no lost submit
    adopts a task it may have created (it waits for that answer, or that failure).
    """

    sent_at: _dt.datetime
    audio_seconds: float | None
    ratio: str | None = None

    def may_have_created(self, task: ListedTask, off_lo: _dt.timedelta) -> bool:
        """Whether ``task`` may be this POST's: created after it was sent (``off_lo``: the
        least server − our clock offset), billed for its audio (if known)."""
        if task.created_at is not None and task.created_at < self.sent_at + off_lo:
            return False
        if self.audio_seconds is None:
            return True
        return durations_match(
            task.video_duration, self.audio_seconds, billed_ratio=task.video_ratio, ratio=self.ratio
        )


@attrs.frozen
class Evidence:
    """Everything the decision reads.

    Attributes:
        own: Our tasks, by id: this client's answered submits and every task a journal we can
            see records.
        listed: One sweep of the task list (newest pages first), with finished candidates'
            billed durations filled in.
        complete_after: The sweep is known to hold every task created at or after this server
            time (the pages were read down past it in order); ``None`` if it proves nothing.
        reached_end: The sweep read the list to its last page.
        settle: How long after we gave up a task may still be created by a POST we sent
            (requests queued in a proxy, a slow handler).
        skew: Tolerance on the ordering of server timestamps when proving absence (wide:
            a wider window only makes a resend rarer).
        slack: The same tolerance when bounding candidates (narrow: it tells the tasks of
            two lost submits apart; the server stamps tasks in milliseconds from one clock).
        clock_margin: Used only for bounding adoption windows when no task of ours relates
            our clock to the server's.
    """

    own: Mapping[str, OwnTask]
    listed: Sequence[ListedTask]
    complete_after: _dt.datetime | None
    reached_end: bool
    settle: _dt.timedelta = _dt.timedelta(seconds=2)
    skew: _dt.timedelta = _dt.timedelta(seconds=1)
    slack: _dt.timedelta = _dt.timedelta(milliseconds=50)
    clock_margin: _dt.timedelta = _dt.timedelta(seconds=30)


@attrs.frozen
class Decision:
    """The verdict for one lost submit, and why.

    Attributes:
        verdict: What to do.
        reason: One sentence for logs and reports.
        task_id: The adopted task (ADOPT only).
        candidates: Tasks that may be ours (UNRESOLVED): keep their videos.
    """

    verdict: Verdict
    reason: str
    task_id: str | None = None
    candidates: tuple[ListedTask, ...] = ()


def clearly_not_for(task: ListedTask, audio: float | None, ratio: str | None = None) -> bool:
    """Whether a finished task was billed for something else than this job's audio: a ratio
    of its own, or a duration well outside the matching tolerance (a task near the edge stays
    unexplained rather than released)."""
    if audio is None or task.status != "SUCCEEDED" or task.video_duration is None:
        return False
    if task.video_ratio and ratio and task.video_ratio != ratio:
        return True
    return abs(task.video_duration - audio) > max(RELEASE_SLACK, RELEASE_FRACTION * audio)


def durations_match(
    billed: float | None,
    audio: float | None,
    *,
    billed_ratio: str | None = None,
    ratio: str | None = None,
) -> bool:
    """Whether a billed duration (and ratio) fits a job's audio."""
    if billed is None or audio is None:
        return False
    if billed_ratio and ratio and billed_ratio != ratio:
        return False
    return abs(billed - audio) <= max(DURATION_SLACK, DURATION_FRACTION * audio)


@attrs.frozen
class _Window:
    """Where a lost submit's task, if it exists, must have been created (server time).

    ``lo``/``hi`` bound it by every piece of evidence (witnesses and our clock mapped through
    our own tasks): the candidates. ``proof_lo``/``proof_hi`` bound it by witnesses alone: any
    task in there we cannot account for forbids concluding that nothing was created.
    """

    lo: _dt.datetime | None  # None: unbounded
    hi: _dt.datetime | None
    proof_lo: _dt.datetime | None
    proof_hi: _dt.datetime | None
    covered: bool  # the sweep provably shows every task created in the proof window
    why_not: str

    def holds(self, t: _dt.datetime | None) -> bool:
        return _between(t, self.lo, self.hi)

    def proof_holds(self, t: _dt.datetime | None) -> bool:
        return _between(t, self.proof_lo, self.proof_hi)


def _between(t: _dt.datetime | None, lo: _dt.datetime | None, hi: _dt.datetime | None) -> bool:
    if t is None:
        return True  # no timestamp: it may be anywhere, so it may be in here
    return (lo is None or t >= lo) and (hi is None or t <= hi)


def _offset(ev: Evidence, seen: Mapping[str, ListedTask]) -> tuple[_dt.timedelta, _dt.timedelta]:
    """Bounds on (server clock − our clock), from our tasks in the sweep."""
    lows: list[_dt.timedelta] = []
    highs: list[_dt.timedelta] = []
    for own in ev.own.values():
        item = seen.get(own.task_id)
        if item is None or item.created_at is None:
            continue
        if own.answered_at is not None:
            lows.append(item.created_at - own.answered_at)
        if own.sent_at is not None:
            highs.append(item.created_at - own.sent_at)
    if not lows or not highs:
        return -ev.clock_margin, ev.clock_margin
    lo, hi = max(lows), min(highs)
    if lo > hi:  # the server's clocks disagree with each other: take the hull
        lo, hi = min(lows), max(highs)
    return lo - ev.slack, hi + ev.slack


def _window(lost: LostSubmit, ev: Evidence, seen: Mapping[str, ListedTask]) -> _Window:
    before: ListedTask | None = None
    after: ListedTask | None = None
    for own in ev.own.values():
        item = seen.get(own.task_id)
        if item is None or item.created_at is None:
            continue
        if own.answered_at is not None and own.answered_at <= lost.sent_at:
            if before is None or item.created_at > before.created_at:  # type: ignore[operator]
                before = item
        if own.sent_at is not None and own.sent_at >= lost.failed_at + ev.settle:
            if after is None or item.created_at < after.created_at:  # type: ignore[operator]
                after = item
    off_lo, off_hi = _offset(ev, seen)
    lo = before.created_at - ev.skew if before and before.created_at else None
    hi = after.created_at + ev.skew if after and after.created_at else None
    why = ""
    if before is None and not ev.reached_end:
        why = "no task of ours from before the submit is visible in the list"
    if after is None:
        why = why or "no later task of ours bounds the window yet"
    if lo is not None and not (
        ev.reached_end or (ev.complete_after is not None and ev.complete_after <= lo)
    ):
        why = why or "the list was not read down to the window"
    if not why and lo is None and not ev.reached_end:
        why = "the list was not read to its end"
    if not why:
        # Every task of ours sent between the witnesses must be visible: a list that misses
        # one of them may miss the lost one too.
        for own in ev.own.values():
            if own.task_id in seen:
                continue
            sent = own.sent_at or own.answered_at
            if sent is None:
                continue
            after_before = before is None or sent >= _own_sent(ev, before.task_id)
            if after_before and after is not None and sent <= _own_sent(ev, after.task_id):
                why = f"our task {own.task_id} from inside the window is missing from the list"
                break
    # Our clock mapped onto the server's through our own tasks: a tighter bound for
    # candidates (it tells two lost submits' tasks apart), never used to prove absence.
    clock_lo = lost.sent_at + off_lo
    clock_hi = lost.failed_at + ev.settle + off_hi
    near_lo = before.created_at - ev.slack if before and before.created_at else None
    near_hi = after.created_at + ev.slack if after and after.created_at else None
    return _Window(
        lo=clock_lo if near_lo is None else max(near_lo, clock_lo),
        hi=clock_hi if near_hi is None else min(near_hi, clock_hi),
        proof_lo=lo,
        proof_hi=hi,
        covered=not why,
        why_not=why,
    )


def _own_sent(ev: Evidence, task_id: str) -> _dt.datetime:
    own = ev.own[task_id]
    t = own.sent_at or own.answered_at
    assert t is not None
    return t


def to_query(lost: Iterable[LostSubmit], ev: Evidence) -> set[str]:
    """Finished tasks in some lost submit's window whose billed duration is not known yet."""
    seen = {t.task_id: t for t in ev.listed if t.task_id}
    wanted: set[str] = set()
    for ls in lost:
        window = _window(ls, ev, seen)
        wanted.update(
            t.task_id
            for t in seen.values()
            if t.task_id not in ev.own
            and t.status == "SUCCEEDED"
            and t.video_duration is None
            and (window.holds(t.created_at) or window.proof_holds(t.created_at))
        )
    return wanted


def decide(
    lost: Iterable[LostSubmit],
    ev: Evidence,
    *,
    flights: Sequence[Flight] = (),
    reserved: Mapping[str, Collection[str]] | None = None,
) -> dict[str, Decision]:
    """Decide every lost submit of one reconciling round together (they may compete for the
    same candidate). A task adopted by one is, from then on, ours for the others: it may be
    what stood between them and a decision, so they are decided again.

    ``flights``: our POSTs still out (their tasks may be in the list, unanswered yet).
    ``reserved``: candidates of lost submits already decided unresolved (task id → their job
    keys): any may be theirs, so none is adopted by another job (it stays a candidate of both).
    """
    pending = list(lost)
    decided: dict[str, Decision] = {}
    while True:
        got = _decide_once(pending, ev, flights, reserved or {})
        adopted = {k: d for k, d in got.items() if d.verdict == Verdict.ADOPT}
        if not adopted:
            decided.update(got)
            return decided
        decided.update(adopted)
        own = dict(ev.own)
        for ls in pending:
            d = adopted.get(ls.key)
            if d is not None and d.task_id is not None:
                own[d.task_id] = OwnTask(d.task_id, sent_at=ls.sent_at)
        pending = [ls for ls in pending if ls.key not in adopted]
        ev = attrs.evolve(ev, own=own)


def _decide_once(
    losts: list[LostSubmit],
    ev: Evidence,
    flights: Sequence[Flight],
    reserved: Mapping[str, Collection[str]],
) -> dict[str, Decision]:
    seen = {t.task_id: t for t in ev.listed if t.task_id}
    off_lo = _offset(ev, seen)[0]
    strangers = [t for t in seen.values() if t.task_id not in ev.own]
    windows = {ls.key: _window(ls, ev, seen) for ls in losts}
    inside = {
        ls.key: [t for t in strangers if windows[ls.key].proof_holds(t.created_at)] for ls in losts
    }
    near = {ls.key: [t for t in strangers if windows[ls.key].holds(t.created_at)] for ls in losts}
    matches = {
        ls.key: [
            t
            for t in near[ls.key]
            if durations_match(
                t.video_duration, ls.audio_seconds, billed_ratio=t.video_ratio, ratio=ls.ratio
            )
        ]
        for ls in losts
    }
    claimed: dict[str, int] = {}
    for found in matches.values():
        for t in found:
            claimed[t.task_id] = claimed.get(t.task_id, 0) + 1
    out: dict[str, Decision] = {}
    for ls in losts:
        # Another job's unresolved submit claims its candidates, as a lost submit of this
        # round would (a job's own candidates do not stand against it).
        mine = {
            t.task_id: claimed[t.task_id] + any(k != ls.key for k in reserved.get(t.task_id, ()))
            for t in matches[ls.key]
        }
        verdict = _verdict(ls, windows[ls.key], inside[ls.key], near[ls.key], matches[ls.key], mine)
        if verdict.verdict == Verdict.ADOPT:
            task = seen[verdict.task_id or ""]
            if any(f.may_have_created(task, off_lo) for f in flights):
                why = f"task {task.task_id} may be that of another submit of ours, unsettled"
                # Bounded: a lost answer noted by a call that was cancelled may never settle.
                verdict = (
                    Decision(Verdict.UNRESOLVED, why, candidates=(task,))
                    if ls.patience_over
                    else Decision(Verdict.WAIT, why)
                )
        out[ls.key] = verdict
    return out


def _verdict(
    lost: LostSubmit,
    window: _Window,
    inside: list[ListedTask],
    near: list[ListedTask],
    matches: list[ListedTask],
    claimed: Mapping[str, int],
) -> Decision:
    """``inside``: strangers in the proof window; ``near``: those that may be this submit's
    task; ``matches``: those of ``near`` billed for this job's audio."""
    running = [t for t in (*near, *inside) if not t.finished]
    if running:
        # Any may be ours, or another lost submit's (which would explain it): their billed
        # durations tell once they finish.
        return Decision(Verdict.WAIT, f"{len(running)} task(s) in the window still running")
    if not window.covered and not lost.patience_over:
        # A later task of ours may yet bound the window, and show whether more is in it.
        return Decision(Verdict.WAIT, window.why_not)
    if len(matches) == 1 and claimed[matches[0].task_id] == 1:
        t = matches[0]
        return Decision(
            Verdict.ADOPT,
            f"task {t.task_id} is the only unknown task in the submit window billed"
            f" {t.video_duration} s for {lost.audio_seconds} s of audio",
            task_id=t.task_id,
        )
    # A finished task billed for clearly other audio is not this job's: it is released, and
    # does not stand in the way of proving that this job's POST created nothing.
    unexplained = [t for t in inside if not clearly_not_for(t, lost.audio_seconds, lost.ratio)]
    if not unexplained:
        if window.covered:
            released = f" ({len(inside)} billed for other audio)" if inside else ""
            return Decision(
                Verdict.RESEND, f"the task list provably shows no task of this job{released}"
            )
        return Decision(
            Verdict.UNRESOLVED, f"the task list cannot show the submit window ({window.why_not})"
        )
    inside = unexplained
    # Whatever else is kept, every finished task that stands in the way of a resend may be
    # this job's (its POST may have been slower than the settling delay): kept too.
    wide = tuple(t for t in inside if t.status == "SUCCEEDED")
    if lost.audio_seconds is None:
        # Nothing can prove a task is this job's; every finished one may be.
        return Decision(
            Verdict.UNRESOLVED,
            f"{len(inside)} unknown task(s) in the submit window and the job's audio duration"
            " is unknown, so none can be attributed",
            candidates=_union(tuple(t for t in near if t.status == "SUCCEEDED"), wide),
        )
    if matches:
        reason = (
            f"{len(matches)} tasks in the submit window match the job's duration"
            if len(matches) > 1
            else f"task {matches[0].task_id} matches this job and another lost submit"
        )
        return Decision(Verdict.UNRESOLVED, reason, candidates=_union(tuple(matches), wide))
    # None billed exactly for this job's audio where its task can be (by our clock), but not
    # clearly for other audio either: not adopted, not resent, and kept.
    maybe = tuple(
        t
        for t in near
        if t.status == "SUCCEEDED" and not clearly_not_for(t, lost.audio_seconds, lost.ratio)
    )
    return Decision(
        Verdict.UNRESOLVED,
        f"{len(inside)} unknown task(s) in the submit window, none provably this job's"
        f" ({lost.audio_seconds} s of audio): not resending while they are unexplained",
        candidates=_union(maybe, wide),
    )


def _union(*groups: tuple[ListedTask, ...]) -> tuple[ListedTask, ...]:
    seen: dict[str, ListedTask] = {}
    for group in groups:
        for t in group:
            seen.setdefault(t.task_id, t)
    return tuple(seen.values())
