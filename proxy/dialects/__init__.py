"""The wire dialects: OpenAI's list, Ollama and LM Studio (REST and SDK socket) with their
translation both ways, and the Anthropic Messages / Responses families translated to chat."""
