"""Three node Corrals, each in its own network namespace, and a front in the root
namespace: real processes on real links (tests/integration/netns.py), fake
llama-servers behind the nodes.

The headline check: a node's link is cut while calls stream through the front; no
call is lost (those that had not reached the node go elsewhere at once, those it held
are resent after the front's first-byte limit), and new calls land on the other two
nodes within a poll interval."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import dns.message
import dns.rrset
import pytest

from tests.fakes import fake_binary, free_port, stop, write_dummy_gguf
from tests.integration.netns import Netns, require_netns

REPO = Path(__file__).resolve().parents[2]
TOKEN = "netns-cluster-token-0123456789"
NODE_PORT = 8080
pytestmark = pytest.mark.timeout(180)


@dataclass
class Proc:
    proc: subprocess.Popen[bytes]
    log_path: Path
    url: str
    ns: Netns | None = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        stop(self.proc)


def _spawn(argv: list[str], cfg: Path, log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("wb") as f:
        return subprocess.Popen(
            [*argv, sys.executable, "-m", "proxy.cli", "serve", "--config", str(cfg)],
            stdout=f, stderr=subprocess.STDOUT, cwd=REPO,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)},
        )


def _wait_health(p: Proc, within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if p.proc.poll() is not None:
            pytest.fail(f"corral exited at start:\n{p.log()}")
        try:
            with socket.create_connection(_hostport(p.url), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    pytest.fail(f"corral did not listen:\n{p.log()}")


def _hostport(url: str) -> tuple[str, int]:
    host, port = url.split("://", 1)[1].rsplit(":", 1)
    return host, int(port)


MODELS = """
[[models]]
name = "m"
path = "{gguf}"
parallel = 2
env = {{ FAKE_TOKEN_DELAY = "0.03" }}
replicas = {{ min = 1, max = 1 }}

[[models]]
name = "warm"
path = "{gguf}"
replicas = {{ min = {warm_min}, max = 1 }}
"""


@dataclass
class Cluster:
    tmp: Path
    fake: Path
    nets: list[Netns]
    nodes: list[Proc] = field(default_factory=list)
    fronts: list[Proc] = field(default_factory=list)

    def start_node(self, i: int) -> Proc:
        ns = self.nets[i]
        gguf = write_dummy_gguf(self.tmp / f"node{i}" / "m.gguf")
        cfg = self.tmp / f"node{i}.toml"
        cfg.write_text(
            f'[server]\nhost = "{ns.addr}"\nport = {NODE_PORT}\nollama_enabled = false\n'
            "lmstudio_enabled = false\n"
            "[scheduler]\nhealth_interval = 0.02\ndrain_timeout = 20\nmemory_budget = 'none'\n"
            f'[llama_server]\nbinary = "{self.fake}"\n'
            f'[cluster]\nrole = "node"\ntoken = "{TOKEN}"\ndrain_settle = 1.5\n'
            + MODELS.format(gguf=gguf, warm_min=1 if i == 2 else 0)
        )
        log_path = self.tmp / f"node{i}.log"
        p = Proc(_spawn(ns.exec_argv([]), cfg, log_path), log_path,
                 f"http://{ns.addr}:{NODE_PORT}", ns)
        self.nodes.append(p)
        _wait_health(p)
        return p

    def start_front(self, cluster_keys: str) -> Proc:
        port = free_port()
        n = len(self.fronts)
        cfg = self.tmp / f"front{n}.toml"
        cfg.write_text(
            f'[server]\nhost = "127.0.0.1"\nport = {port}\nollama_port = {free_port()}\n'
            f"lmstudio_port = {free_port()}\n"
            "[scheduler]\nremote_check_interval = 1\nqueue_timeout = 30\n"
            f'[cluster]\nrole = "front"\ntoken = "{TOKEN}"\npoll_interval = 0.5\n'
            f"connect_timeout = 1\nfirst_byte_timeout = 4\n{cluster_keys}\n"
        )
        log_path = self.tmp / f"front{n}.log"
        p = Proc(_spawn([], cfg, log_path), log_path, f"http://127.0.0.1:{port}")
        self.fronts.append(p)
        _wait_health(p)
        return p

    def nodes_toml(self) -> str:
        urls = ", ".join(f'"http://{ns.addr}:{NODE_PORT}"' for ns in self.nets)
        return f"nodes = [{urls}]"


@pytest.fixture
def netns_cluster(tmp_path: Path) -> Iterator[Cluster]:
    require_netns()
    nets: list[Netns] = []
    c = Cluster(tmp_path, fake_binary(tmp_path / "bin"), nets)
    try:
        for i in range(3):
            nets.append(Netns.create(i))
        yield c
    finally:
        for p in [*c.fronts, *c.nodes]:
            p.stop()
        for ns in nets:
            ns.delete()


async def node_served(session: aiohttp.ClientSession, node: Proc, model: str = "m",
                      settled: bool = True) -> int:
    """Calls of ``model`` the node has finished; when ``settled``, read once it has
    none in flight.

    A node counts a call served when it releases the lease, just after the last byte
    of the answer went out: a client that reads the count right after its own answer
    could otherwise see the call still in flight (seen once: 2 of 3 counted)."""
    deadline = time.monotonic() + (5 if settled else 0)
    while True:
        async with session.get(node.url + "/corral/node",
                               headers={"Authorization": f"Bearer {TOKEN}"},
                               timeout=aiohttp.ClientTimeout(total=2)) as resp:
            state = await resp.json()
        mine = [m for m in state["models"] if m["name"] == model]
        if not any(m["in_flight"] for m in mine) or time.monotonic() > deadline:
            return sum(i["served"] for m in mine for i in m["instances"])
        await asyncio.sleep(0.05)


async def wait_until(pred: Callable[[], Any], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not await pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {within} s")
        await asyncio.sleep(0.1)


async def ready_everywhere(session: aiohttp.ClientSession, c: Cluster, front: Proc) -> None:
    async def ok() -> bool:
        async with session.get(front.url + "/corral/nodes") as resp:
            nodes = (await resp.json())["nodes"]
        if len(nodes) != 3 or not all(n["healthy"] for n in nodes):
            return False
        for node in c.nodes:
            async with session.get(node.url + "/corral/node",
                                   headers={"Authorization": f"Bearer {TOKEN}"}) as resp:
                state = await resp.json()
            if not all(m["ready_slots"] for m in state["models"] if m["name"] == "m"):
                return False
        return True

    await wait_until(ok, 30, "every node ready")
    await asyncio.sleep(1.0)  # a poll that sees every instance ready


async def call(session: aiohttp.ClientSession, front: Proc, text: str,
               model: str = "m", tokens: int = 10, **kw: Any) -> dict[str, Any]:
    async with session.post(front.url + "/v1/chat/completions", json={
        "model": model, "messages": [{"role": "user", "content": text}],
        "max_tokens": tokens, **kw}) as resp:
        body = await resp.json()
        assert resp.status == 200, body
        return body  # type: ignore[no-any-return]


@pytest.mark.parametrize("inside", [False, True], ids=["cut-at-front", "cut-at-node"])
async def test_three_nodes_spread_stick_prefer_warm_and_survive_a_cut(
    netns_cluster: Cluster, inside: bool,
) -> None:
    c = netns_cluster
    for i in range(3):
        c.start_node(i)
    front = c.start_front(c.nodes_toml())
    async with aiohttp.ClientSession() as s:
        await ready_everywhere(s, c, front)

        # Spread by load: 6 concurrent calls, 2 slots per node.
        base = [await node_served(s, n) for n in c.nodes]
        await asyncio.gather(*(call(s, front, f"spread {k}", tokens=20) for k in range(6)))
        spread = [await node_served(s, n) - b for n, b in zip(c.nodes, base, strict=True)]
        assert spread == [2, 2, 2], spread

        # A conversation sticks to one node.
        base = [await node_served(s, n) for n in c.nodes]
        # The prefix key is the system prompt and first turn (proxy/edge/jsonc.py).
        history = [{"role": "system", "content": "You are terse."},
                   {"role": "user", "content": "one long conversation starts here"}]
        for turn in range(4):
            async with s.post(front.url + "/v1/chat/completions",
                              json={"model": "m", "messages": history}) as resp:
                body = await resp.json()
            history += [body["choices"][0]["message"], {"role": "user", "content": f"t{turn}"}]
        stuck = [await node_served(s, n) - b for n, b in zip(c.nodes, base, strict=True)]
        assert sorted(stuck) == [0, 0, 4], stuck

        # A model loaded on node 2 is preferred over a cold launch on 0 or 1.
        for k in range(3):
            await call(s, front, f"warm {k}", model="warm")
        warm = [await node_served(s, n, "warm") for n in c.nodes]
        assert warm == [0, 0, 3], warm

        # Cut node 0's link under load: no call lost, traffic moves within seconds.
        results: list[float] = []
        stop = asyncio.Event()

        async def client(k: int) -> None:
            n = 0
            while not stop.is_set():
                await call(s, front, f"load {k} {n}", tokens=8)
                results.append(time.monotonic())
                n += 1

        clients = [asyncio.ensure_future(client(k)) for k in range(6)]
        await asyncio.sleep(2.0)
        before_cut = [await node_served(s, n, settled=False) for n in c.nodes[1:]]
        c.nets[0].cut(inside)
        cut_at = time.monotonic()

        async def node0_out() -> bool:
            async with s.get(front.url + "/corral/nodes") as resp:
                nodes = (await resp.json())["nodes"]
            return not next(n for n in nodes if n["url"] == c.nodes[0].url)["healthy"]

        await wait_until(node0_out, 5.0, "node 0 out of rotation")
        left_after = time.monotonic() - cut_at
        await asyncio.sleep(1.0)
        mid = [await node_served(s, n, settled=False) for n in c.nodes[1:]]
        # Long enough for calls held by node 0 to pass the first-byte limit (4 s) and
        # be resent.
        await asyncio.sleep(5.0)
        stop.set()
        await asyncio.gather(*clients)  # a lost call raises here
        after = [await node_served(s, n) for n in c.nodes[1:]]
        c.nets[0].mend()
        assert left_after < 3.0, left_after
        # Calls kept completing after the cut, on the two other nodes.
        done_after_cut = [t for t in results if t > cut_at + 2.0]
        assert len(done_after_cut) >= 12, len(done_after_cut)
        assert all(b > a for a, b in zip(before_cut, mid, strict=True)), (before_cut, mid)
        assert all(b > a for a, b in zip(mid, after, strict=True)), (mid, after)
        front_log = front.log()
        print(f"cut: node 0 out of rotation after {left_after:.2f} s; {len(results)} calls "
              f"completed, {len(done_after_cut)} of them from 2 s after the cut; served by "
              f"nodes 1, 2: {before_cut} -> {mid} -> {after}")
        assert "out of rotation" in front_log


async def test_a_node_drained_with_sigterm_finishes_its_calls(netns_cluster: Cluster) -> None:
    c = netns_cluster
    for i in range(3):
        c.start_node(i)
    front = c.start_front(c.nodes_toml())
    async with aiohttp.ClientSession() as s:
        await ready_everywhere(s, c, front)
        long_calls = [asyncio.ensure_future(call(s, front, f"long {k}", tokens=60))
                      for k in range(6)]  # 60 tokens x 30 ms: about 2 s each
        await asyncio.sleep(0.5)
        victim = c.nodes[1]
        held = await node_served(s, victim, settled=False)  # finished so far: none
        victim.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(1.0)  # the front's poll sees "draining"
        new_calls = [call(s, front, f"new {k}", tokens=4) for k in range(6)]
        for body in await asyncio.gather(*long_calls, *new_calls):
            assert body["choices"][0]["message"]["content"]
        long_bodies = [t.result() for t in long_calls]
        assert all(b["usage"]["completion_tokens"] == 60 for b in long_bodies)
        assert victim.proc.wait(timeout=30) == 0
        log = victim.log()
        assert "drained in" in log, log[-2000:]
        assert held == 0


# -- DNS discovery against a stub resolver ---------------------------------------------


class StubDns:
    """Answers A queries for one name from a mutable list, over UDP."""

    def __init__(self, name: str, addrs: list[str]) -> None:
        self.name = name
        self.addrs = addrs
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        # resolv.conf has no port: the stub takes port 53 on an address of its own, one
        # per test process (as netns.py's links are): a fixed 127.77.0.53 made a second
        # suite running at once fail with "Address already in use".
        pid = os.getpid()
        self.addr = f"127.77.{(pid >> 8) % 256}.{pid % 256 or 1}"
        try:
            self.sock.bind((self.addr, 53))
        except OSError:
            self.sock.close()
            raise
        self.sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self.sock.recvfrom(4096)
            except OSError:
                continue
            q = dns.message.from_wire(data)
            r = dns.message.make_response(q)
            question = q.question[0]
            if question.name.to_text() == self.name and question.rdtype == 1:
                r.answer.append(dns.rrset.from_text_list(self.name, 1, "IN", "A",
                                                         list(self.addrs)))
            self.sock.sendto(r.to_wire(), peer)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()


async def test_dns_discovery_follows_the_headless_service(
    netns_cluster: Cluster, tmp_path: Path,
) -> None:
    c = netns_cluster
    for i in range(3):
        c.start_node(i)
    name = "corral-nodes.test."
    stub = StubDns(name, [ns.addr for ns in c.nets])
    try:
        resolv = tmp_path / "resolv.conf"
        resolv.write_text(f"nameserver {stub.addr}\nsearch test\noptions ndots:5\n")
        front = c.start_front(f'discover = "dns:corral-nodes:{NODE_PORT}"\n'
                              f'resolv_conf = "{resolv}"\ndiscover_interval = 0.5')
        async with aiohttp.ClientSession() as s:
            async def count(n: int) -> bool:
                async with s.get(front.url + "/corral/nodes") as resp:
                    nodes = (await resp.json())["nodes"]
                return len(nodes) == n and all(x["healthy"] for x in nodes)

            await wait_until(lambda: count(3), 20, "three nodes discovered")
            await call(s, front, "via dns")
            stub.addrs = [c.nets[0].addr]
            await wait_until(lambda: count(1), 10, "the service shrank to one node")
            base = await node_served(s, c.nodes[0])
            for k in range(3):
                await call(s, front, f"one node {k}")
            assert await node_served(s, c.nodes[0]) - base == 3
    finally:
        stub.close()


CLIENTS = 8


async def test_a_node_killed_under_load_loses_no_call(netns_cluster: Cluster) -> None:
    """Issue 25: one of two nodes is SIGKILLed while calls flow. Its open connections
    reset and new ones are refused; each call that failed there is resent to the other
    node (never back to the dead one), so every call is answered."""
    c = netns_cluster
    for i in range(2):
        c.start_node(i)
    urls = ", ".join(f'"{n.url}"' for n in c.nodes)
    front = c.start_front(f"nodes = [{urls}]")
    async with aiohttp.ClientSession() as s:
        async def both_ready() -> bool:
            async with s.get(front.url + "/corral/nodes") as resp:
                nodes = (await resp.json())["nodes"]
            return len(nodes) == 2 and all(n["healthy"] for n in nodes)

        await wait_until(both_ready, 30, "both nodes in rotation")
        done: list[float] = []
        failed: list[str] = []
        stop_load = asyncio.Event()

        async def client(k: int) -> None:
            n = 0
            while not stop_load.is_set() and n < 400:
                try:
                    await call(s, front, f"load {k} {n}", tokens=8)
                    done.append(time.monotonic())
                except (AssertionError, aiohttp.ClientError) as e:
                    failed.append(f"{k}/{n}: {e}")
                n += 1

        clients = [asyncio.ensure_future(client(k)) for k in range(CLIENTS)]
        await asyncio.sleep(2.0)
        served_before = await node_served(s, c.nodes[1], settled=False)
        c.nodes[0].proc.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        await asyncio.sleep(4.0)
        stop_load.set()
        await asyncio.gather(*clients)
        served_after = await node_served(s, c.nodes[1])
    assert not failed, failed[:5]
    after_kill = [t for t in done if t > killed_at]
    assert len(after_kill) >= 12, len(after_kill)
    assert served_after > served_before
    print(f"kill: {len(done)} calls answered, {len(after_kill)} after the kill, "
          f"none lost; node 1 served {served_before} -> {served_after}")
