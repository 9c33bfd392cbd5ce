-- failure_rate_daily: finished (terminal) live runs per workspace, UTC creation day and workflow type
-- (NULL type = run whose workflow is unknown), with the share that failed.
CREATE OR REPLACE VIEW failure_rate_daily AS
SELECT
    workspace,
    created_date,
    workflow_type,
    count(*)                                      AS finished,
    count(*) FILTER (WHERE status = 'completed')  AS completed,
    count(*) FILTER (WHERE status = 'failed')     AS failed,
    count(*) FILTER (WHERE status = 'stopped')    AS stopped,
    CAST(count(*) FILTER (WHERE status = 'failed') AS DOUBLE) / count(*) AS failure_rate
FROM run_facts
WHERE is_terminal
GROUP BY workspace, created_date, workflow_type;
