"""Corral as a cluster: nodes that serve models, fronts that route calls to nodes.

``policy`` (pure) chooses a node for a call; ``state`` is what a node reports about
itself; ``nodes`` polls those reports from a front; ``discovery`` finds nodes in DNS.
The front plugs into the ordinary scheduler: each node is a remote upstream of the
models it serves, and node choice replaces the scheduler's instance choice.
"""
