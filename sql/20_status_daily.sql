-- status_daily: live runs per UTC creation day and current status.
CREATE OR REPLACE VIEW status_daily AS
SELECT created_date, status, count(*) AS runs
FROM run_facts
GROUP BY created_date, status;
