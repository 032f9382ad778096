"""What LLM and image calls share: the model registry, routing and fallbacks, circuit breakers, shared rate
limits, budgets, request history and per-model statistics. Each module owns one concern (and, where it
keeps state in MongoDB, the one collection it reads and writes)."""
