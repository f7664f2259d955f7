"""Speech and images through Corral (issue 30): what relaying them costs.

Run by hand, never in the suite::

    .venv/bin/python -m tests.bench.bench_media [--mb 200] [--repeat 3]

A real ``corral serve`` runs the fake media engine (``tests/fakes/fake_media.py``) as the
built-in ``kokoro`` and ``sd-server`` runtimes beside a fake llama-server chat model,
under ``max_instances = 1``. Printed, for the engine reached directly and through Corral:

- **speech bulk**: a ``--mb`` MB speech answer read as it comes: MB/s, and the most
  Corral's RSS grew meanwhile (it relays chunk by chunk, so about nothing);
- **image bulk**: an image answer of ``--mb`` MB of base64 JSON, the same figures;
- **speech TTFB**: time to the first audio byte of a paced answer (20 ms per chunk),
  an instance already running;
- **swap**: seconds for chat -> image -> chat under one instance (two swaps, each a
  launch of the other model and a stop).

Each figure is the best of ``--repeat`` runs; the load average is printed first.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil

from tests.fakes import fake_binary, stop, wait_healthy, write_dummy_gguf

REPO = Path(__file__).resolve().parents[2]
MEDIA = Path(REPO / "tests" / "fakes" / "fake_media.py")
CHUNK = 256 << 10


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Peak(threading.Thread):
    """The most a process's RSS grew over its start, sampled every 5 ms."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.proc = psutil.Process(pid)
        self.before = self.peak = self.proc.memory_info().rss
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.005)

    def grew(self) -> int:
        self.done.set()
        self.join()
        return self.peak - self.before


def _bulk(url: str, body: dict[str, object], corral_pid: int | None) -> tuple[float, int, int]:
    """(seconds, bytes, RSS growth of Corral) for one answer read as it comes."""
    peak = _Peak(corral_pid) if corral_pid is not None else None
    if peak is not None:
        peak.start()
    size = 0
    start = time.perf_counter()
    with httpx.stream("POST", url, json=body, timeout=300) as r:
        r.raise_for_status()
        for chunk in r.iter_raw(1 << 20):
            size += len(chunk)
    took = time.perf_counter() - start
    return took, size, peak.grew() if peak is not None else 0


def _ttfb(url: str, body: dict[str, object]) -> float:
    start = time.perf_counter()
    with httpx.stream("POST", url, json=body, timeout=60) as r:
        next(r.iter_raw())
        return time.perf_counter() - start


def _engine(env: dict[str, str]) -> tuple[subprocess.Popen[bytes], str]:
    port = _port()
    proc = subprocess.Popen([sys.executable, str(MEDIA), "--port", str(port)],
                            env={**os.environ, **env}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            httpx.get(url + "/health", timeout=1)
            break
        except httpx.HTTPError:
            time.sleep(0.05)
    return proc, url


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    chunks = (args.mb << 20) // CHUNK
    image_bytes = (args.mb << 20) * 3 // 4  # as base64: --mb MB
    env = {"FAKE_SPEECH_CHUNKS": str(chunks), "FAKE_SPEECH_CHUNK": str(CHUNK),
           "FAKE_SPEECH_PACE": "0", "FAKE_IMAGE_BYTES": str(image_bytes),
           "FAKE_IMAGE_SECONDS": "0"}
    print(f"load average: {os.getloadavg()}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        fake = fake_binary(root / "bin")
        port = _port()
        media = json.dumps([sys.executable, str(MEDIA), "--host", "${HOST}", "--port",
                            "${PORT}"])
        envs = ", ".join(f'{k} = "{v}"' for k, v in env.items())
        cfg = root / "corral.toml"
        cfg.write_text(
            f'[server]\nport = {port}\n[llama_server]\nbinary = "{fake}"\n'
            f'[scheduler]\nmax_instances = 1\nslot_cache_dir = "{root / "slots"}"\n'
            f"[runtimes.kokoro]\ncommand = {media}\n[runtimes.sd-server]\ncommand = {media}\n"
            f'[[models]]\nname = "chat"\npath = "{write_dummy_gguf(root / "c.gguf")}"\n'
            f'[[models]]\nname = "tts"\nruntime = "kokoro"\nenv = {{ {envs} }}\n'
            f'[[models]]\nname = "sd"\nruntime = "sd-server"\nenv = {{ {envs} }}\n'
            f'[[models]]\nname = "paced"\nruntime = "kokoro"\n'
            f'env = {{ FAKE_SPEECH_PACE = "0.02" }}\n')
        log = (root / "corral.log").open("wb")
        proc = subprocess.Popen([sys.executable, "-m", "proxy.cli", "serve", "--config",
                                 str(cfg)], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        engine, direct = _engine(env)
        paced, paced_url = _engine({"FAKE_SPEECH_PACE": "0.02"})
        try:
            wait_healthy(f"http://127.0.0.1:{port}", proc, root / "corral.log")
            url = f"http://127.0.0.1:{port}"
            speech = {"model": "tts", "input": "bench"}
            image = {"model": "sd", "prompt": "bench"}
            rows = []
            for name, path, body in (("speech bulk", "/v1/audio/speech", speech),
                                     ("image bulk", "/v1/images/generations", image)):
                _bulk(url + path, body, None)  # launch it first
                best_direct = min(_bulk(direct + path, body, None)[0]
                                  for _ in range(args.repeat))
                runs = [_bulk(url + path, body, proc.pid) for _ in range(args.repeat)]
                took, size, _ = min(runs)
                grew = max(r[2] for r in runs)
                rows.append((name, size / best_direct / 1e6, size / took / 1e6, grew))
            print(f"\n{'answer':<12} {'direct MB/s':>12} {'Corral MB/s':>12} "
                  f"{'Corral RSS growth':>18}")
            for name, d, c, grew in rows:
                print(f"{name:<12} {d:>12.0f} {c:>12.0f} {grew / 2**20:>15.1f} MiB")
            paced_body = {"model": "paced", "input": "x"}
            _ttfb(url + "/v1/audio/speech", paced_body)  # launch it first
            t_direct = min(_ttfb(paced_url + "/v1/audio/speech", paced_body)
                           for _ in range(args.repeat))
            t_corral = min(_ttfb(url + "/v1/audio/speech", paced_body)
                           for _ in range(args.repeat))
            print(f"\nspeech TTFB (engine pace 20 ms per chunk): direct {t_direct * 1e3:.1f} ms,"
                  f" through Corral {t_corral * 1e3:.1f} ms")
            swaps = []
            for _ in range(args.repeat):
                start = time.perf_counter()
                for body, path in ((image, "/v1/images/generations"),
                                   ({"model": "chat", "max_tokens": 2, "messages": [
                                       {"role": "user", "content": "hi"}]},
                                    "/v1/chat/completions")):
                    httpx.post(url + path, json={**body, "n": 1} if path.startswith(
                        "/v1/images") else body, timeout=120).raise_for_status()
                swaps.append(time.perf_counter() - start)
            print(f"swap chat -> image -> chat (max_instances = 1): best {min(swaps):.2f} s")
        finally:
            for p in (engine, paced):
                p.terminate()
                p.wait(10)
            stop(proc, 30)
            log.close()


if __name__ == "__main__":
    main()
