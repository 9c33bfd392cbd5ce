-- status_daily: live runs per workspace, UTC creation day and current status.
CREATE OR REPLACE VIEW status_daily AS
SELECT workspace, created_date, status, count(*) AS runs
FROM run_facts
GROUP BY workspace, created_date, status;
