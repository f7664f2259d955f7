"""How much does `scan` cost? Start `corral serve` over N hard links of a GGUF (or
symbolic links, `--links`: the watcher then also stats every link's target) and
report when it listens, when all N models are listed, and its idle CPU; then the
same without `scan`. Run by hand; figures are reported, never asserted.

    .venv/bin/python tests/bench/bench_scan.py [--files 2000] [--gguf PATH] [--links]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[2]


def run(cfg: Path, want: int) -> tuple[float, float, float]:
    t0 = time.monotonic()
    p = subprocess.Popen([sys.executable, "-m", "proxy.cli", "serve", "--config", str(cfg)],
                         cwd=REPO, stderr=subprocess.PIPE, text=True)
    assert p.stderr is not None
    port = 0
    for line in p.stderr:
        m = re.search(r"OpenAI API on http://[\d.]+:(\d+)", line)
        if m:
            port = int(m.group(1))
            break
    listening = time.monotonic() - t0

    def listed() -> int:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models") as r:
            return len(json.load(r)["data"])

    while listed() < want:
        time.sleep(0.05)
    all_listed = time.monotonic() - t0
    time.sleep(5)
    proc = psutil.Process(p.pid)
    c0 = sum(proc.cpu_times()[:2])
    time.sleep(10)
    idle = (sum(proc.cpu_times()[:2]) - c0) / 10
    p.terminate()
    p.wait(30)
    return listening, all_listed, idle


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=1, help="runs of each case, alternating")
    ap.add_argument("--gguf", type=Path,
                    default=Path.home() / ".cache/corral/models/gemma-3-270m-q4_k_m.gguf")
    ap.add_argument("--links", action="store_true", help="symbolic links, not hard links")
    args = ap.parse_args()
    place = os.symlink if args.links else os.link
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "DIR"
        for i in range(args.files):
            d = root / f"d{i % 40}"
            d.mkdir(parents=True, exist_ok=True)
            place(args.gguf, d / f"m{i}-Q4_K_M.gguf")
        base = '[server]\nport = 0\nollama_port = 0\nlmstudio_port = 0\n'
        cases = [("without scan", "", 0),
                 (f"scan of {args.files} files", f'scan = ["{root}"]', args.files)]
        for label, scan, want in cases * args.repeat:
            cfg = Path(tmp) / "corral.toml"
            cfg.write_text(f"{base}[scheduler]\n{scan}\n")
            listening, listed, idle = run(cfg, want)
            print(f"{label}: listening at {listening:.2f} s, {want} models listed at "
                  f"{listed:.2f} s, idle CPU {idle * 100:.1f} % of a core")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
