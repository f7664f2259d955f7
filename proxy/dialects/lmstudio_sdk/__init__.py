"""The LM Studio SDK websocket protocol (lmstudio-python, @lmstudio/sdk) on port 1234.

codec: frames; socket: auth and dispatch; channel: what handlers get; models:
listing, lookup, load/unload; llm: predictions and text RPCs; config: prediction
config → llama-server fields; history: chat history → messages; upstream: the one
llama-server call.
"""

from proxy.dialects.lmstudio_sdk.socket import NAMESPACES, add_routes, greeting

__all__ = ["NAMESPACES", "add_routes", "greeting"]
