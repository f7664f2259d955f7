"""Corral's decisions and processes. Never imports aiohttp.web."""
