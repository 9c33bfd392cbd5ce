-- sync_history: one row per sync attempt (each attempt syncs one workspace) from the sync_runs
-- ledger, with the rows it changed.
CREATE OR REPLACE VIEW sync_history AS
SELECT
    workspace, sync_id, started_at, finished_at, outcome, mode, verified, pages, requests,
    retries, runs_seen, rows_new, rows_updated, rows_unchanged, rows_deleted, rows_undeleted,
    rows_rejected,
    coalesce(rows_new, 0) + coalesce(rows_updated, 0) + coalesce(rows_deleted, 0)
        + coalesce(rows_undeleted, 0) AS rows_changed,
    seconds_extract, seconds_load, seconds_total, error
FROM sync_runs;

-- sync_health: one row per workspace that has sync attempts: its last successful sync, how
-- fresh it is (seconds since it finished, at query time), its last attempt, and failure counts.
-- NULLs before a workspace's first success. Alert on every row (bool_and), not on any one.
CREATE OR REPLACE VIEW sync_health AS
WITH ok AS (
    SELECT * FROM sync_history WHERE outcome = 'success'
    QUALIFY row_number() OVER (PARTITION BY workspace ORDER BY sync_id DESC) = 1
), last AS (
    SELECT * FROM sync_history
    QUALIFY row_number() OVER (PARTITION BY workspace ORDER BY sync_id DESC) = 1
), agg AS (
    SELECT
        h.workspace,
        count(*)                                          AS syncs,
        count(*) FILTER (WHERE h.outcome = 'success')     AS successes,
        count(*) FILTER (WHERE h.outcome = 'failed')      AS failures,
        count(*) FILTER (WHERE h.outcome = 'abandoned')   AS abandoned,
        count(*) FILTER (WHERE h.outcome IN ('failed', 'abandoned')
                         AND h.sync_id > coalesce(ok.sync_id, 0)) AS failures_since_success,
        max(h.started_at) FILTER (WHERE h.outcome IN ('failed', 'abandoned')) AS last_failure_at,
        avg(h.rows_changed) FILTER (WHERE h.outcome = 'success')  AS avg_rows_changed,
        avg(h.runs_seen) FILTER (WHERE h.outcome = 'success')     AS avg_runs_seen,
        avg(h.seconds_total) FILTER (WHERE h.outcome = 'success') AS avg_seconds_total
    FROM sync_history AS h
    LEFT JOIN ok ON ok.workspace = h.workspace
    GROUP BY h.workspace
)
SELECT
    agg.workspace,
    ok.sync_id                                                    AS last_success_sync_id,
    ok.finished_at                                                AS last_success_at,
    CAST(epoch_us(now()) - epoch_us(ok.finished_at) AS DOUBLE) / 1000000 AS freshness_seconds,
    ok.runs_seen                                                  AS last_success_runs_seen,
    ok.rows_changed                                               AS last_success_rows_changed,
    ok.seconds_total                                              AS last_success_seconds,
    last.sync_id                                                  AS last_attempt_sync_id,
    last.outcome                                                  AS last_attempt_outcome,
    last.started_at                                               AS last_attempt_started_at,
    last.error                                                    AS last_attempt_error,
    agg.* EXCLUDE (workspace)
FROM agg
LEFT JOIN ok ON ok.workspace = agg.workspace
LEFT JOIN last ON last.workspace = agg.workspace;
