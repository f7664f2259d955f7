"""Finding nodes in DNS: ``discover = "dns:NAME:PORT"`` names a headless Service,
whose A and AAAA records are the ready node pods. Resolved every
``discover_interval`` seconds with the resolver configuration in ``resolv_conf``
(search domains and ndots included, as in a pod), so nodes that scale in or out
join or leave the front's rotation within one interval.

A lookup that fails keeps the last answer: a resolver hiccup must not empty the
rotation. An answer with no records (NXDOMAIN included) is an answer: no nodes.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import dns.asyncresolver
import dns.exception
import dns.rdatatype
import dns.resolver

log = logging.getLogger(__name__)


def parse_target(discover: str) -> tuple[str, int]:
    """``dns:NAME:PORT`` → (NAME, PORT); the config validated the shape."""
    _, name, port = discover.split(":")
    return name, int(port)


def node_url(address: str, port: int) -> str:
    ip = ipaddress.ip_address(address)
    host = f"[{ip}]" if ip.version == 6 else str(ip)
    return f"http://{host}:{port}"


class DnsDiscovery:
    def __init__(self, discover: str, resolv_conf: Path, interval: float,
                 on_nodes: Callable[[Sequence[str]], None]) -> None:
        self.name, self.port = parse_target(discover)
        self._resolv_conf = resolv_conf
        self._interval = interval
        self._on_nodes = on_nodes
        self.last: list[str] | None = None
        self.failure: str | None = None

    def _resolver(self) -> dns.asyncresolver.Resolver:
        # Read each time: a pod's resolv.conf does not change, a test's may.
        r = dns.asyncresolver.Resolver(filename=str(self._resolv_conf))
        r.lifetime = min(self._interval, 5.0)
        return r

    async def lookup(self) -> list[str]:
        """Node URLs for the name's A and AAAA records, sorted; raises on failure."""
        resolver = self._resolver()
        found: set[str] = set()
        for rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            try:
                answer = await resolver.resolve(self.name, rdtype, search=True)
            except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
                continue
            found.update(node_url(r.to_text(), self.port) for r in answer)
        return sorted(found)

    async def resolve_once(self) -> None:
        try:
            urls = await self.lookup()
        except (dns.exception.DNSException, OSError) as e:
            reason = str(e) or type(e).__name__
            if reason != self.failure:
                log.warning("cluster: looking up %s failed (%s); keeping %d node(s)",
                            self.name, reason, len(self.last or []))
            self.failure = reason
            return
        self.failure = None
        if urls != self.last:
            log.info("cluster: %s has %d node(s): %s", self.name, len(urls), ", ".join(urls))
            self.last = urls
        self._on_nodes(urls)

    async def run(self) -> None:
        while True:
            await self.resolve_once()
            await asyncio.sleep(self._interval)
