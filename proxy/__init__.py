"""Corral's HTTP side: dialects in, one internal call out. Only this package imports
aiohttp.web; the scheduler never does."""

__version__ = "0.1.0"
