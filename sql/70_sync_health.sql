-- sync_history: one row per sync attempt from the sync_runs ledger, with the rows it changed.
CREATE OR REPLACE VIEW sync_history AS
SELECT
    sync_id, started_at, finished_at, outcome, mode, verified, pages, requests, retries,
    runs_seen, rows_new, rows_updated, rows_unchanged, rows_deleted, rows_undeleted, rows_rejected,
    coalesce(rows_new, 0) + coalesce(rows_updated, 0) + coalesce(rows_deleted, 0)
        + coalesce(rows_undeleted, 0) AS rows_changed,
    seconds_extract, seconds_load, seconds_total, error
FROM sync_runs;

-- sync_health: always exactly one row: the last successful sync, how fresh it is (seconds since
-- it finished, at query time), the last attempt, and failure counts. NULLs before any success.
CREATE OR REPLACE VIEW sync_health AS
WITH ok AS (
    SELECT * FROM sync_history WHERE outcome = 'success' ORDER BY sync_id DESC LIMIT 1
), last AS (
    SELECT * FROM sync_history ORDER BY sync_id DESC LIMIT 1
), agg AS (
    SELECT
        count(*)                                          AS syncs,
        count(*) FILTER (WHERE outcome = 'success')       AS successes,
        count(*) FILTER (WHERE outcome = 'failed')        AS failures,
        count(*) FILTER (WHERE outcome = 'abandoned')     AS abandoned,
        count(*) FILTER (WHERE outcome IN ('failed', 'abandoned') AND sync_id > coalesce(
            (SELECT max(sync_id) FROM sync_runs WHERE outcome = 'success'), 0))
                                                          AS failures_since_success,
        max(started_at) FILTER (WHERE outcome IN ('failed', 'abandoned')) AS last_failure_at,
        avg(rows_changed) FILTER (WHERE outcome = 'success')  AS avg_rows_changed,
        avg(runs_seen) FILTER (WHERE outcome = 'success')     AS avg_runs_seen,
        avg(seconds_total) FILTER (WHERE outcome = 'success') AS avg_seconds_total
    FROM sync_history
)
SELECT
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
    agg.*
FROM agg
LEFT JOIN ok ON true
LEFT JOIN last ON true;
