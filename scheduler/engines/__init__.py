"""Engines behind Corral: command runtimes (vLLM, SGLang, whisper.cpp, Ollama, any
server command), remote servers and providers that host many models.

The scheduler sees every engine through the same two servables: an ``Instance`` (a
child Corral launches, whatever its command) and a ``Remote`` (a server it only
calls). This package holds what differs per engine: the config tables
(``settings``), the argv templates (``runtime``), the remote endpoint (``remote``)
and the provider listings (``providers``).
"""
