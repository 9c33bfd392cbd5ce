-- workflow_duration_stats: one row per workspace and workflow id seen in live runs. Counts cover every live run;
-- durations and the failure rate cover finished (terminal) runs only. Percentiles interpolate
-- linearly between the two nearest durations (quantile_cont).
CREATE OR REPLACE VIEW workflow_duration_stats AS
SELECT
    workspace,
    workflow_id,
    workflow_name,
    workflow_type,
    count(*)                                         AS runs,
    count(*) FILTER (WHERE is_terminal)              AS finished,
    count(*) FILTER (WHERE status = 'completed')     AS completed,
    count(*) FILTER (WHERE status = 'failed')        AS failed,
    count(*) FILTER (WHERE status = 'stopped')       AS stopped,
    count(*) FILTER (WHERE NOT is_terminal)          AS open,
    CAST(count(*) FILTER (WHERE status = 'failed') AS DOUBLE)
        / nullif(count(*) FILTER (WHERE is_terminal), 0) AS failure_rate,
    quantile_cont(duration_seconds, 0.50)            AS p50_seconds,
    quantile_cont(duration_seconds, 0.90)            AS p90_seconds,
    quantile_cont(duration_seconds, 0.95)            AS p95_seconds,
    quantile_cont(duration_seconds, 0.99)            AS p99_seconds,
    max(duration_seconds)                            AS max_seconds,
    avg(duration_seconds)                            AS mean_seconds,
    max(created_at)                                  AS last_run_at
FROM run_facts
GROUP BY workspace, workflow_id, workflow_name, workflow_type;
