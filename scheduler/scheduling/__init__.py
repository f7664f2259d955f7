"""The Scheduler itself: leases, the fair wait queue, the dispatcher, launching and retiring,
and the pure policy its decisions come from (see docs/scheduling.md)."""
