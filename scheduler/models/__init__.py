"""Model files: where they come from (paths, packages, pulls), what they need (RAM/VRAM
footprints, GGUF headers) and what they serve (capabilities)."""
