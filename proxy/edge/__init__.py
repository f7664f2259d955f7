"""The edge: what every request meets before a handler (Host/Origin guards, API keys,
listeners' own limits, body reading, error rendering per dialect, request ids and the
recent-request log, the JSON codec, process tuning)."""
