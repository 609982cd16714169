"""The jobs (worker and dispatch, training, pre-annotation, reconcile, Label Studio sync, export,
forget, versions, simulate); they stand on rlhf_core and never import ml_backend or rlhf_cli."""
