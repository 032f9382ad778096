"""LLM output schemas, prompt loading and rendering, world formatting."""
