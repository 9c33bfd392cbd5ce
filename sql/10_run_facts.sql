-- run_facts: one row per live run (soft-deleted runs excluded), joined to its workflow, with the
-- duration of terminal runs and UTC grouping keys. Every other run view builds on this one.
-- Every view starts with workspace: the same run or workflow id in two workspaces is two rows.
-- timezone('UTC', ts) turns a TIMESTAMPTZ into a UTC wall-clock TIMESTAMP, so dates and hours are
-- UTC whatever the TimeZone setting of the session reading the view.
-- The terminal statuses are filled in from runs_etl.engine.models.TERMINAL_STATUSES when the
-- view is applied (runs_etl.warehouse.views).
CREATE OR REPLACE VIEW run_facts AS
SELECT
    r.workspace,
    r.id                                                        AS run_id,
    r.group_id,
    r.workflow_id,
    w.name                                                      AS workflow_name,
    w.type                                                      AS workflow_type,
    r.status,
    coalesce(r.status IN {terminal_statuses}, false) AS is_terminal,
    r.progress,
    r.source,
    r.created_at,
    r.finished_at,
    CASE WHEN r.status IN {terminal_statuses}
         THEN CAST(epoch_us(r.finished_at) - epoch_us(r.created_at) AS DOUBLE) / 1000000
    END                                                         AS duration_seconds,
    CAST(timezone('UTC', r.created_at) AS DATE)                 AS created_date,
    date_trunc('hour', timezone('UTC', r.created_at))           AS created_hour,
    CAST(hour(timezone('UTC', r.created_at)) AS INTEGER)        AS created_hour_of_day
FROM runs AS r
LEFT JOIN workflows AS w ON w.workspace = r.workspace AND w.id = r.workflow_id
WHERE r._deleted_at IS NULL;
