"""Tools beside the model (docs/tools.md): configured MCP servers called for a client's
call in a bounded loop, and Corral's own MCP server at ``/mcp``."""
