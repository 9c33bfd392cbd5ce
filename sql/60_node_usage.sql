-- node_usage: how often each node id appears in live runs (nodes of soft-deleted runs left out).
CREATE OR REPLACE VIEW node_usage AS
SELECT
    n.node_id,
    count(*)                         AS occurrences,
    count(DISTINCT n.run_id)         AS runs,
    CAST(count(DISTINCT n.run_id) AS DOUBLE)
        / (SELECT count(*) FROM runs WHERE _deleted_at IS NULL) AS run_share,
    count(DISTINCT r.workflow_id)    AS workflows,
    min(r.created_at)                AS first_seen_at,
    max(r.created_at)                AS last_seen_at
FROM run_nodes AS n
JOIN runs AS r ON r.id = n.run_id AND r._deleted_at IS NULL
GROUP BY n.node_id;
