"""API keys: lookup, model scopes, sliding-window limits and usage."""
