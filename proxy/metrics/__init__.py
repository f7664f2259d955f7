"""Prometheus: the registry and collectors, what a scrape reads, the request middleware
and GET /metrics."""
