-- wrk script: a non-streaming OpenAI chat completion, the same body on every request.
-- Used by bench_proxy.py against /v1/chat/completions, directly and through Corral.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer sk-corral-bench-7f3a9c1e5b2d8f4a6c0e9b1d3f5a7c9e"  -- bench_proxy.BENCH_KEY
wrk.body = '{"model":"bench","messages":[{"role":"user","content":"Say hello."}],"max_tokens":8}'
