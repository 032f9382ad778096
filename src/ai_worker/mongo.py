"""Type names for PyMongo's async API, so stores and their callers say what they hold instead of `Any`."""

from __future__ import annotations

from typing import Any, TypeAlias

from pymongo import AsyncMongoClient
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase

Document: TypeAlias = dict[str, Any]  # a BSON document: its values really are arbitrary
Database: TypeAlias = AsyncDatabase[Document]
Collection: TypeAlias = AsyncCollection[Document]
Client: TypeAlias = AsyncMongoClient[Document]

__all__ = ["Client", "Collection", "Database", "Document"]
