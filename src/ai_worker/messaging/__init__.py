"""Kafka: event models, consumer (commit tracking, dead letters), producer."""
