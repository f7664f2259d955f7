"""Leases across processes: the owner's lease server, the workers' scheduler, the frames
between them."""
