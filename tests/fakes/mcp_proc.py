"""Start and stop the test MCP servers (tests/fakes/mcp_tools.py) as child processes."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STDIO = (sys.executable, "-m", "tests.fakes.mcp_tools", "stdio")


def env() -> dict[str, str]:
    """What a stdio server needs to import the test tree."""
    return {"PYTHONPATH": str(ROOT)}


@contextlib.contextmanager
def http_server() -> Iterator[str]:
    """A streamable HTTP MCP server on loopback: its endpoint URL."""
    proc = subprocess.Popen([sys.executable, "-m", "tests.fakes.mcp_tools", "http"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=ROOT,
                            env={**os.environ, **env()}, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # bounded: the child prints it or exits
        if not line.startswith("PORT "):
            raise RuntimeError(f"the MCP test server did not start: {line!r}")
        yield f"http://127.0.0.1:{int(line.split()[1])}/mcp"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
