-- When the control plane last wrote any counter (staleness check).
SELECT max(updated_at) AS latest FROM usage_counters
