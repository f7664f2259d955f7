"""The call path: the route table, the one upstream call (lease, send, resend, loading
feedback), the relay and stream readers/writers, egress, multipart bodies, usage taps,
images in a call, and what a model's GGUF says for listings."""
