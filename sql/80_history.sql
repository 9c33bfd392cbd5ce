-- History views over run_history: one row per observed version of a run. A sync sees a run's
-- state at its start time only, so every change is known to within a window: it happened
-- after `observed_after` (the start of the last sync that saw the previous state) and no later
-- than `observed_by` (the start of the first sync that saw the new one). Bounds are as tight as
-- the sync interval: with a sync every 15 minutes, a status change is placed within ~15
-- minutes, and a time in a status is known to within ~30 (entry and exit windows). Live runs
-- only (soft-deleted runs are excluded, as everywhere in sql/).

-- status_transitions: one row per observed change of a run's status.
CREATE OR REPLACE VIEW status_transitions AS
WITH versions AS (
    SELECT
        h.workspace, h.run_id, h.status, h.valid_from, h.observed_after,
        lag(h.status) OVER w AS from_status,
        lag(h.valid_from) OVER w AS previous_from
    FROM run_history AS h
    JOIN runs AS r ON r.workspace = h.workspace AND r.id = h.run_id
    WHERE r._deleted_at IS NULL
    WINDOW w AS (PARTITION BY h.workspace, h.run_id ORDER BY h.valid_from)
)
SELECT
    workspace, run_id, from_status, status AS to_status,
    observed_after, valid_from AS observed_by
FROM versions
WHERE previous_from IS NOT NULL AND from_status IS DISTINCT FROM status;

-- time_in_status: per run and status, how long the run was in it, as observed bounds in
-- seconds. A version was entered after observed_after (or the run's created_at, for its first
-- version) and by valid_from; it was left after _last_seen_at and by valid_to. So the time in
-- it is at least _last_seen_at - valid_from and at most valid_to - entry. `ongoing`: the run is
-- still in that status (no upper bound yet: upper_seconds is NULL).
-- (Aggregated from run_history alone, then joined to runs once per run and status: a join
-- feeding a 1M-group aggregate ran out of a 128MB memory_limit at 1M runs. A version entered
-- with no earlier sighting (observed_after NULL: a run's first, or one after it came back from
-- a delete at the source) is bounded by created_at: from its exit time when it is the only one
-- of its run and status, version by version for the rare pairs with more.)
CREATE OR REPLACE VIEW time_in_status AS
WITH per_status AS (
    SELECT
        workspace, run_id, status,
        count(*) AS versions,
        sum(epoch(_last_seen_at - valid_from)) AS lower_seconds,
        bool_or(valid_to IS NULL) AS ongoing,
        sum(greatest(epoch(valid_to - observed_after), 0))
            FILTER (WHERE observed_after IS NOT NULL) AS upper_observed,
        count(*) FILTER (WHERE observed_after IS NULL) AS entered_unseen,
        max(valid_to) FILTER (WHERE observed_after IS NULL) AS unseen_exit
    FROM run_history
    GROUP BY workspace, run_id, status
),
unseen_pairs AS (
    SELECT workspace, run_id, status FROM per_status WHERE entered_unseen > 1
),
unseen_upper AS (
    SELECT h.workspace, h.run_id, h.status,
           sum(greatest(epoch(h.valid_to - r.created_at), 0)) AS upper_unseen
    FROM run_history AS h
    JOIN unseen_pairs AS u ON u.workspace = h.workspace AND u.run_id = h.run_id
        AND u.status IS NOT DISTINCT FROM h.status
    JOIN runs AS r ON r.workspace = h.workspace AND r.id = h.run_id
    WHERE h.observed_after IS NULL
    GROUP BY h.workspace, h.run_id, h.status
)
SELECT
    p.workspace, p.run_id, r.workflow_id, p.status, p.versions, p.lower_seconds,
    CASE WHEN NOT p.ongoing THEN
        coalesce(p.upper_observed, 0) + CASE p.entered_unseen
            WHEN 0 THEN 0
            WHEN 1 THEN greatest(epoch(p.unseen_exit - r.created_at), 0)
            ELSE u.upper_unseen END
    END AS upper_seconds,
    p.ongoing
FROM per_status AS p
JOIN runs AS r ON r.workspace = p.workspace AND r.id = p.run_id
LEFT JOIN unseen_upper AS u ON u.workspace = p.workspace AND u.run_id = p.run_id
    AND u.status IS NOT DISTINCT FROM p.status
WHERE r._deleted_at IS NULL;

-- queue_time_daily: per workspace, workflow and UTC creation day, how long runs waited from
-- creation before leaving `queued` (for running, or any other status), as bounds in seconds:
-- the run left the queue after the last sync that saw it queued and by the first that did not.
-- Only runs some sync saw queued count (a run that started between two syncs was never
-- observed waiting); those still queued are counted apart (still_queued).
CREATE OR REPLACE VIEW queue_time_daily AS
WITH seen_queued AS (
    SELECT workspace, run_id, min(valid_from) AS first_queued
    FROM run_history WHERE status = 'queued'
    GROUP BY workspace, run_id
),
left_queue AS (
    SELECT h.workspace, h.run_id, min(h.valid_from) AS observed_by,
           arg_min(h.observed_after, h.valid_from) AS observed_after
    FROM run_history AS h
    JOIN seen_queued AS q USING (workspace, run_id)
    WHERE h.status IS DISTINCT FROM 'queued' AND h.valid_from > q.first_queued
    GROUP BY h.workspace, h.run_id
),
waits AS (
    SELECT
        r.workspace, r.workflow_id, CAST(timezone('UTC', r.created_at) AS DATE) AS created_date,
        l.run_id IS NOT NULL AS started,
        -- greatest(): the API's clock may run ahead of ours (created "after" a sync began).
        greatest(epoch(l.observed_after - r.created_at), 0) AS wait_lower,
        greatest(epoch(l.observed_by - r.created_at), 0) AS wait_upper
    FROM runs AS r
    JOIN seen_queued AS q ON q.workspace = r.workspace AND q.run_id = r.id
    LEFT JOIN left_queue AS l ON l.workspace = r.workspace AND l.run_id = r.id
    WHERE r._deleted_at IS NULL
)
SELECT
    w.workspace, w.workflow_id, any_value(f.name) AS workflow_name, w.created_date,
    count(*) FILTER (started) AS runs,
    avg(wait_lower) FILTER (started) AS avg_wait_lower_seconds,
    avg(wait_upper) FILTER (started) AS avg_wait_upper_seconds,
    max(wait_lower) FILTER (started) AS max_wait_lower_seconds,
    max(wait_upper) FILTER (started) AS max_wait_upper_seconds,
    count(*) FILTER (NOT started) AS still_queued
FROM waits AS w
LEFT JOIN workflows AS f ON f.workspace = w.workspace AND f.id = w.workflow_id
GROUP BY w.workspace, w.workflow_id, w.created_date;
