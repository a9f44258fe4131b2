-- Billed usage per instance (issue 12): the seconds billing.billed_usage holds per
-- (org, day, tier), kept per instance so support can answer "why was instance X
-- billed 7.5 h". Written in the transaction that replaces the day's billed_usage;
-- per (org, day, tier) the rows sum exactly to billed_usage (the blocking asset
-- check `instances_sum_to_orgs`). The per-instance over_daily split: docs/metering.md.
CREATE TABLE billing.billed_usage_instances (
  org_id text NOT NULL,
  usage_date date NOT NULL,
  instance_id text NOT NULL,
  tier text NOT NULL,
  runtime_seconds bigint NOT NULL CHECK (runtime_seconds >= 0),
  idle_paused_seconds bigint NOT NULL CHECK (idle_paused_seconds >= 0),
  over_continuous_seconds bigint NOT NULL CHECK (over_continuous_seconds >= 0),
  over_daily_seconds bigint NOT NULL CHECK (over_daily_seconds >= 0),
  billable_seconds bigint NOT NULL CHECK (billable_seconds >= 0),
  computed_at timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (usage_date, org_id, instance_id),
  CHECK (runtime_seconds = idle_paused_seconds + over_continuous_seconds
                           + over_daily_seconds + billable_seconds)
);
