"""structlog setup, metrics, the health/stats HTTP endpoint."""
