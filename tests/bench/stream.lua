-- wrk script: a streaming completion. Sent to /v1/completions, which the nginx stand-in
-- (tests/fakes/nginx_upstream.sh) always answers with a fixed SSE stream of 10 chunks and
-- [DONE], because nginx cannot read "stream" from the body. Corral reads it and relays the
-- stream chunk by chunk; wrk times each request to the end of the stream.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer sk-corral-bench-7f3a9c1e5b2d8f4a6c0e9b1d3f5a7c9e"  -- bench_proxy.BENCH_KEY
wrk.body = '{"model":"bench","prompt":"Say hello.","max_tokens":10,"stream":true}'
