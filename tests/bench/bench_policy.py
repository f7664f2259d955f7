"""What request policy costs a call (scheduler/config/policy.py, proxy/calls/policy.py):
the per-call work of the call path's hook, in process, without sockets.

Run by hand, never by the test suite::

    .venv/bin/python tests/bench/bench_policy.py [--repeat 5]

Three cases, each the best of ``--repeat`` timings of many calls:

- no policy: what ``upstream._attempts`` does for a model without a policy or a
  variant (one truth test of an empty dict);
- a variant's lookup: finding the shape of a call (``shape_for``);
- shaping a body: a Claude Code sized Anthropic Messages body (~30 KB, about 7,500
  tokens) parsed, a clamp, a default and an override applied, encoded again.
"""

from __future__ import annotations

import argparse
import timeit

from proxy.calls.call import Call
from proxy.calls.policy import shape_for, shaped
from proxy.edge import jsonc
from scheduler.config.policy import RequestPolicy, Shape, Variant, compile_rules


def _body(kb: int) -> bytes:
    words = ("lorem ipsum dolor sit amet consectetur " * 2000)[: kb * 1024]
    return jsonc.dumps({
        "model": "qwen3:think", "max_tokens": 32000, "stream": True,
        "system": [{"type": "text", "text": words[: len(words) // 2]}],
        "messages": [{"role": "user", "content": words[len(words) // 2:]}],
        "tools": [{"name": f"tool{i}", "description": "does things",
                   "input_schema": {"type": "object"}} for i in range(20)],
    })


def best(stmt: object, number: int, repeat: int) -> float:
    """Seconds per call, the fastest of ``repeat`` runs."""
    return min(timeit.repeat(stmt, number=number, repeat=repeat)) / number  # type: ignore[arg-type]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--kb", type=int, default=30)
    args = ap.parse_args()
    policy = RequestPolicy(clamp={"max_tokens": {"max": 2048}},
                           defaults={"temperature": 0.6})
    variant = Variant(name="qwen3:think",
                      params={"chat_template_kwargs.enable_thinking": True})
    shape = Shape("qwen3", "qwen3:think", compile_rules(policy, variant))
    shapes = {"qwen3:think": shape}
    empty: dict[str, Shape] = {}
    body = _body(args.kb)
    call = Call(model="qwen3:think", path="/v1/messages", body=body)

    def none() -> object:
        return shape_for(empty, "m", "m") if empty else None

    def lookup() -> object:
        return shape_for(shapes, "qwen3:think", "qwen3") if shapes else None

    def shaping() -> object:
        return shaped(call, shape)

    def parse_only() -> object:
        return jsonc.dumps(jsonc.loads(body))

    print(f"body: {len(body) / 1024:.1f} KiB")
    print(f"no policy (the hook's test):      {best(none, 200_000, args.repeat) * 1e9:8.0f} ns")
    print(f"a variant's shape found:          {best(lookup, 200_000, args.repeat) * 1e9:8.0f} ns")
    print(f"body shaped (parse, apply, dump): {best(shaping, 2_000, args.repeat) * 1e6:8.1f} µs")
    print(f"  of which parse and dump alone:  {best(parse_only, 2_000, args.repeat) * 1e6:8.1f} µs")


if __name__ == "__main__":
    main()
