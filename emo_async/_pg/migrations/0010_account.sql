-- One DashScope account shared by several processes: its rate limits, its poller's lease and
-- its open tasks. Every time here is the server's (clock_timestamp()), never a host's.

-- The adaptive GCRA state of one endpoint family of one account (see _pg/_limits.py).
CREATE TABLE emo_account_limits (
    account        text NOT NULL,
    family         text NOT NULL,
    max_rate       double precision NOT NULL CHECK (max_rate > 0),
    rate           double precision NOT NULL CHECK (rate > 0),
    target         double precision NOT NULL,
    -- Theoretical arrival time: the earliest instant the next permit may be used.
    tat            timestamptz NOT NULL DEFAULT 'epoch',
    paused_until   timestamptz NOT NULL DEFAULT 'epoch',
    last_cut       timestamptz NOT NULL DEFAULT 'epoch',
    last_throttle  timestamptz NOT NULL DEFAULT 'epoch',
    acquired       bigint NOT NULL DEFAULT 0,
    throttled      bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (account, family)
);

-- Who polls for the account: one row per account, held while lease_until is in the future.
CREATE TABLE emo_account_leader (
    account      text PRIMARY KEY,
    owner        text NOT NULL,
    term         bigint NOT NULL DEFAULT 1,
    lease_until  timestamptz NOT NULL,
    acquired_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- Every task of the account some process waits for; the leader polls the open ones and
-- writes each final snapshot (result) or the reason it gave up (error).
CREATE TABLE emo_account_tasks (
    account        text NOT NULL,
    task_id        text NOT NULL,
    owner          text NOT NULL,
    audio_seconds  double precision,
    submitted_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    status         text NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'finished', 'error')),
    result         jsonb,
    error          text,
    finished_at    timestamptz,
    PRIMARY KEY (account, task_id)
);

CREATE INDEX emo_account_tasks_open ON emo_account_tasks (account) WHERE status = 'open';
CREATE INDEX emo_account_tasks_finished ON emo_account_tasks (finished_at)
    WHERE status <> 'open';
