-- open_runs: live runs not in a terminal state, with their age in seconds at query time.
CREATE OR REPLACE VIEW open_runs AS
SELECT
    workspace, run_id, workflow_id, workflow_name, workflow_type, status, progress, source, created_at,
    CAST(epoch_us(now()) - epoch_us(created_at) AS DOUBLE) / 1000000 AS age_seconds
FROM run_facts
WHERE NOT is_terminal;

-- stuck_runs: open runs older than analytics.stuck_after. Every sync stores that setting in
-- sync_state under 'stuck_after_seconds' for every workspace ('*'); 24 h until one has.
CREATE OR REPLACE VIEW stuck_runs AS
WITH threshold AS (
    SELECT coalesce(
        (SELECT TRY_CAST(value AS DOUBLE) FROM sync_state
         WHERE workspace = '*' AND key = 'stuck_after_seconds'),
        86400.0) AS stuck_after_seconds
)
SELECT o.*, t.stuck_after_seconds
FROM open_runs AS o, threshold AS t
WHERE o.age_seconds > t.stuck_after_seconds;
