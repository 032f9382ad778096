"""Image providers (OpenRouter image output, offline renderer), image validation and the image service."""
