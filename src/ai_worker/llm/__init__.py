"""OpenAI-compatible chat client: structured output, validation and repair, usage and cost."""
