"""Network namespaces for cluster tests: each node Corral on its own link.

``Netns.create(i)`` makes namespace ``corral-<pid><i>`` joined to the root namespace
by a veth pair: 10.77.<n>.1 on the root side, 10.77.<n>.2 inside, where n is the
test process's own block of three (n = 3 * (pid % 80) + i): two suites running at
once on one machine get different links. Cutting the root
side (``cut()``, ``ip link set ... down``) is a cable pulled at the front's end: the
route goes with the link, new connections fail at once (network unreachable) and
open ones hear nothing more. ``cut(inside=True)`` pulls it at the node's end: the
front keeps its route, packets vanish, so it sees timeouts, not errors. Every
namespace is deleted by the fixture that made it, whatever the test did; deleting a
namespace deletes its veth pair.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass

import pytest


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


def require_netns() -> None:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2 (CI and this machine have both)")


@dataclass
class Netns:
    name: str
    host_if: str
    addr: str
    host_addr: str

    @classmethod
    def create(cls, i: int) -> Netns:
        assert 0 <= i < 3, "three links per test process"
        tag = f"{os.getpid() % 100000}{i}"
        n = 3 * (os.getpid() % 80) + i
        ns = cls(f"corral-{tag}", f"cvh{tag}", f"10.77.{n}.2", f"10.77.{n}.1")
        inner = ns.inner_if
        _ip("netns", "add", ns.name)
        try:
            _ip("link", "add", ns.host_if, "type", "veth", "peer", "name", inner)
            _ip("link", "set", inner, "netns", ns.name)
            _ip("addr", "add", f"{ns.host_addr}/24", "dev", ns.host_if)
            _ip("link", "set", ns.host_if, "up")
            _ip("-n", ns.name, "addr", "add", f"{ns.addr}/24", "dev", inner)
            _ip("-n", ns.name, "link", "set", inner, "up")
            _ip("-n", ns.name, "link", "set", "lo", "up")
        except BaseException:
            ns.delete()
            raise
        return ns

    @property
    def inner_if(self) -> str:
        return "cvn" + self.host_if[3:]

    def cut(self, inside: bool = False) -> None:
        if inside:
            _ip("-n", self.name, "link", "set", self.inner_if, "down")
        else:
            _ip("link", "set", self.host_if, "down")

    def mend(self) -> None:
        _ip("-n", self.name, "link", "set", self.inner_if, "up")
        _ip("link", "set", self.host_if, "up")

    def delete(self) -> None:
        subprocess.run(["ip", "link", "del", self.host_if], capture_output=True, timeout=10)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, timeout=10)

    def exec_argv(self, argv: list[str]) -> list[str]:
        # `ip netns exec` execs the command: its pid is the command's, so a signal
        # sent to the process reaches Corral itself.
        return ["ip", "netns", "exec", self.name, *argv]
