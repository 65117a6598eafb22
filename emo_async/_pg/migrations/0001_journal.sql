-- The shared journal: batches, their jobs, the task history of the account, the candidate
-- tasks of unresolved jobs, and the detection and upload caches of the account.
-- An "account" is the caller's fingerprint of the API key: every table that speaks for the
-- whole account (tasks, caches) is keyed by it, so two accounts may share one database.

CREATE TABLE emo_batches (
    id bigserial PRIMARY KEY,
    account text NOT NULL,
    name text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    UNIQUE (account, name)
);

CREATE TABLE emo_jobs (
    -- Register order: what unfinished(), records() and claim() follow.
    seq bigserial PRIMARY KEY,
    batch_id bigint NOT NULL REFERENCES emo_batches (id) ON DELETE CASCADE,
    -- Copied from the batch so account-wide questions (known tasks, open intents) need no join.
    account text NOT NULL,
    key text NOT NULL,
    name text NOT NULL,
    job jsonb NOT NULL,
    phase text NOT NULL CHECK (phase IN ('new', 'intent', 'unresolved', 'submitted',
        'finished', 'done', 'failed', 'rejected', 'expired', 'cancelled')),
    attempts integer NOT NULL DEFAULT 0,
    task_id text,
    -- intent_at is the caller's clock (it bounds the reconciler's window against the API's
    -- times); intent_server_at is the server's, the one other workers compare with.
    intent_at timestamptz,
    intent_server_at timestamptz,
    submitted_at timestamptz,
    task_status text,
    video_url text,
    url_deadline timestamptz,
    billed_seconds double precision,
    billed_earlier double precision NOT NULL DEFAULT 0,
    path text,
    host text,
    size bigint,
    sha256 text,
    error jsonb,
    reason text,
    -- Claims: which worker works on the job, until when (server clock) unless it heartbeats.
    owner text,
    lease_until timestamptz,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    UNIQUE (batch_id, key),
    UNIQUE (account, task_id)
);
CREATE INDEX emo_jobs_batch_phase ON emo_jobs (batch_id, phase, seq);
CREATE INDEX emo_jobs_owner ON emo_jobs (batch_id, owner) WHERE owner IS NOT NULL;
CREATE INDEX emo_jobs_open_intents ON emo_jobs (account) WHERE phase IN ('intent', 'unresolved');

-- Every task that is or was some job's, over every attempt: a task belongs to one job for good.
CREATE TABLE emo_tasks (
    account text NOT NULL,
    task_id text NOT NULL,
    batch_id bigint NOT NULL REFERENCES emo_batches (id) ON DELETE CASCADE,
    key text NOT NULL,
    submitted_at timestamptz,
    recorded_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (account, task_id)
);

CREATE TABLE emo_candidates (
    batch_id bigint NOT NULL REFERENCES emo_batches (id) ON DELETE CASCADE,
    key text NOT NULL,
    account text NOT NULL,
    task_id text NOT NULL,
    created_at timestamptz,
    status text,
    video_duration double precision,
    video_url text,
    url_deadline timestamptz,
    path text,
    host text,
    size bigint,
    sha256 text,
    PRIMARY KEY (batch_id, key, task_id),
    FOREIGN KEY (batch_id, key) REFERENCES emo_jobs (batch_id, key) ON DELETE CASCADE
);
CREATE INDEX emo_candidates_task ON emo_candidates (account, task_id);

CREATE TABLE emo_detections (
    account text NOT NULL,
    image_digest text NOT NULL,
    ratio text NOT NULL,
    detection jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (account, image_digest, ratio)
);

CREATE TABLE emo_uploads (
    account text NOT NULL,
    digest text NOT NULL,
    model text NOT NULL,
    url text NOT NULL,
    expires_at timestamptz NOT NULL,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (account, digest, model)
);

-- The same lock, taken by whoever makes a task some job's and by whoever lists it as a
-- candidate, so an owned task can never be left behind as somebody's candidate.
CREATE FUNCTION emo_task_lock(account text, task_id text) RETURNS void
LANGUAGE sql VOLATILE AS $$
    SELECT pg_advisory_xact_lock(hashtextextended(account || chr(31) || task_id, 7));
$$;

-- A job's new task enters the history (its primary key refuses a task that is another job's),
-- and leaves every candidate list of the account.
CREATE FUNCTION emo_jobs_task_history() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM emo_task_lock(NEW.account, NEW.task_id);
    INSERT INTO emo_tasks (account, task_id, batch_id, key, submitted_at)
        VALUES (NEW.account, NEW.task_id, NEW.batch_id, NEW.key, NEW.submitted_at);
    DELETE FROM emo_candidates WHERE account = NEW.account AND task_id = NEW.task_id;
    RETURN NULL;
END;
$$;
CREATE TRIGGER emo_jobs_task_history AFTER UPDATE OF task_id ON emo_jobs
    FOR EACH ROW WHEN (NEW.task_id IS NOT NULL AND NEW.task_id IS DISTINCT FROM OLD.task_id)
    EXECUTE FUNCTION emo_jobs_task_history();
CREATE TRIGGER emo_jobs_task_history_insert AFTER INSERT ON emo_jobs
    FOR EACH ROW WHEN (NEW.task_id IS NOT NULL)
    EXECUTE FUNCTION emo_jobs_task_history();

-- A job leaving "unresolved" (settled, whatever wrote it) has no candidates any more.
CREATE FUNCTION emo_jobs_settled() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM emo_candidates WHERE batch_id = NEW.batch_id AND key = NEW.key;
    RETURN NULL;
END;
$$;
CREATE TRIGGER emo_jobs_settled AFTER UPDATE OF phase ON emo_jobs
    FOR EACH ROW WHEN (NEW.phase <> 'unresolved' AND OLD.phase = 'unresolved')
    EXECUTE FUNCTION emo_jobs_settled();
