-- Statistics so the planner hashes the small code table instead of probing its index.
ANALYZE tally_instance_codes
