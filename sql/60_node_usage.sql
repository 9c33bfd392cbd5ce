-- node_usage: how often each node id appears in the live runs of a workspace (nodes of
-- soft-deleted runs left out); run_share is out of that workspace's live runs.
CREATE OR REPLACE VIEW node_usage AS
WITH live AS (
    SELECT workspace, count(*) AS runs FROM runs WHERE _deleted_at IS NULL GROUP BY workspace
)
SELECT
    n.workspace,
    n.node_id,
    count(*)                         AS occurrences,
    count(DISTINCT n.run_id)         AS runs,
    CAST(count(DISTINCT n.run_id) AS DOUBLE) / any_value(l.runs) AS run_share,
    count(DISTINCT r.workflow_id)    AS workflows,
    min(r.created_at)                AS first_seen_at,
    max(r.created_at)                AS last_seen_at
FROM run_nodes AS n
JOIN runs AS r ON r.workspace = n.workspace AND r.id = n.run_id AND r._deleted_at IS NULL
JOIN live AS l ON l.workspace = n.workspace
GROUP BY n.workspace, n.node_id;
