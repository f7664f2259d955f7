"""``[server] workers = N``: the owner's side (forwarding, stats merge) and a worker
process's entry point."""
