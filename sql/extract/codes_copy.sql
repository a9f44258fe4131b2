COPY tally_instance_codes (instance_id, code) FROM STDIN
