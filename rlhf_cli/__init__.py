"""The `rlhf-backend` commands (serve, worker, train, preannotate, simulate, reconcile, ...): the
top layer, which wires the HTTP face (ml_backend) and the jobs (trainer) together."""
