"""A small in-memory stand-in for PyMongo's async database, for fast unit tests (and mutation testing) of
stores that use single-document operations: find_one, insert_one, update_one (with upsert) and
find_one_and_update. Query operators: equality, $lt, $lte, $gt, $gte, $in, $ne; update operators: $set,
$setOnInsert, $inc, $max, $push. `fail_next(op, exc)` makes the next call of an operation raise, as a database
that went away would. It is not MongoDB: integration tests run the same stores against the real server."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

Doc = dict[str, Any]


@dataclass
class UpdateResult:
    matched_count: int
    modified_count: int
    upserted_id: Any = None


def _get(doc: Doc, path: str) -> Any:
    value: Any = doc
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return _MISSING
        value = value[part]
    return value


def _set(doc: Doc, path: str, value: Any) -> None:
    parts = path.split(".")
    for part in parts[:-1]:
        doc = doc.setdefault(part, {})
    doc[parts[-1]] = value


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


_MISSING = _Missing()


def _compare(value: Any, op: str, arg: Any) -> bool:
    if op == "$in":
        return (None if value is _MISSING else value) in arg
    if op == "$ne":
        return (None if value is _MISSING else value) != arg
    if value is _MISSING or value is None:
        return False
    if op == "$lt":
        return bool(value < arg)
    if op == "$lte":
        return bool(value <= arg)
    if op == "$gt":
        return bool(value > arg)
    if op == "$gte":
        return bool(value >= arg)
    raise NotImplementedError(op)


def matches(doc: Doc, query: Doc) -> bool:
    for key, cond in query.items():
        if key == "$or":
            if not any(matches(doc, q) for q in cond):
                return False
            continue
        value = _get(doc, key)
        if isinstance(cond, dict) and cond and all(k.startswith("$") for k in cond):
            if not all(_compare(value, op, arg) for op, arg in cond.items()):
                return False
        elif (None if value is _MISSING else value) != cond:
            return False
    return True


class FakeCollection:
    def __init__(self, name: str) -> None:
        self.name = name
        self.docs: dict[Any, Doc] = {}
        self.calls: list[str] = []
        self._faults: dict[str, list[BaseException]] = {}

    def fail_next(self, op: str, exc: BaseException) -> None:
        self._faults.setdefault(op, []).append(exc)

    def _enter(self, op: str) -> None:
        self.calls.append(op)
        faults = self._faults.get(op)
        if faults:
            raise faults.pop(0)

    def _candidates(self, query: Doc) -> list[Doc]:
        key = query.get("_id", _MISSING)
        if key is not _MISSING and not isinstance(key, dict):  # by id: one look-up, not a scan
            found = self.docs.get(key)
            return [found] if found is not None else []
        return list(self.docs.values())

    async def insert_one(self, doc: Doc) -> None:
        self._enter("insert_one")
        if doc["_id"] in self.docs:
            raise KeyError(f"duplicate _id {doc['_id']!r}")
        self.docs[doc["_id"]] = copy.deepcopy(doc)

    async def find_one(self, query: Doc, projection: Doc | None = None) -> Doc | None:
        self._enter("find_one")
        for doc in self._candidates(query):
            if matches(doc, query):
                out = copy.deepcopy(doc)
                if projection:
                    keep = {k for k, v in projection.items() if v} | {"_id"}
                    out = {k: v for k, v in out.items() if k in keep}
                return out
        return None

    def _apply(self, doc: Doc, update: Doc, inserting: bool) -> bool:
        before = copy.deepcopy(doc)
        for op, fields in update.items():
            for path, arg in fields.items():
                current = _get(doc, path)
                if op == "$set" or (op == "$setOnInsert" and inserting):
                    _set(doc, path, copy.deepcopy(arg))
                elif op == "$setOnInsert":
                    continue
                elif op == "$inc":
                    _set(doc, path, (0 if current is _MISSING else current) + arg)
                elif op == "$push":
                    _set(doc, path, [*([] if current is _MISSING else current), copy.deepcopy(arg)])
                elif op == "$max":
                    _set(doc, path, arg if current is _MISSING or arg > current else current)
                else:
                    raise NotImplementedError(op)
        return doc != before

    async def update_one(self, query: Doc, update: Doc, upsert: bool = False, **kwargs: Any) -> UpdateResult:
        self._enter("update_one")
        for doc in self._candidates(query):
            if matches(doc, query):
                return UpdateResult(1, int(self._apply(doc, update, inserting=False)))
        if not upsert:
            return UpdateResult(0, 0)
        new: Doc = {k: v for k, v in query.items() if not k.startswith("$") and not isinstance(v, dict)}
        if "_id" in new and new["_id"] in self.docs:  # the query did not match an existing _id: MongoDB's 11000
            from pymongo.errors import DuplicateKeyError

            raise DuplicateKeyError("E11000 duplicate key error")
        self._apply(new, update, inserting=True)
        self.docs[new["_id"]] = new
        return UpdateResult(0, 0, upserted_id=new["_id"])

    async def delete_one(self, query: Doc) -> None:
        self._enter("delete_one")
        for doc in self._candidates(query):
            if matches(doc, query):
                del self.docs[doc["_id"]]
                return

    async def find_one_and_update(self, query: Doc, update: Doc, **kwargs: Any) -> Doc | None:
        self._enter("find_one_and_update")
        for doc in self._candidates(query):
            if matches(doc, query):
                before = copy.deepcopy(doc)
                self._apply(doc, update, inserting=False)
                return copy.deepcopy(doc) if kwargs.get("return_document") else before
        return None


class FakeDatabase:
    def __init__(self) -> None:
        self.collections: dict[str, FakeCollection] = {}

    def __getitem__(self, name: str) -> FakeCollection:
        return self.collections.setdefault(name, FakeCollection(name))
