"""Models found on disk without writing config: plain folders, Hugging Face's cache,
LM Studio's tree and Ollama's store (one module per layout), the scanner that names
them, and the watcher that keeps the scheduler's "scan" models current."""
