"""The HTTP face Label Studio talks to (app factory, routes, webhook proof, /metrics, dashboard,
gunicorn server); it stands on rlhf_core and never imports trainer or rlhf_cli."""
