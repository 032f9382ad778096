"""Library log records keep their level, except aiokafka's rebalance commit refusal, which needs no action."""

from __future__ import annotations

import io
import json
import logging

from ai_worker.observability.logging import configure_logging


def _levels(out: io.StringIO) -> list[tuple[str, str]]:
    return [(line["level"], line["event"]) for line in map(json.loads, out.getvalue().splitlines())]


def test_a_commit_refused_during_a_rebalance_is_a_warning_other_errors_stay_errors() -> None:
    out = io.StringIO()
    configure_logging("INFO", stream=out)
    try:
        coordinator = logging.getLogger("aiokafka.consumer.group_coordinator")
        coordinator.error("OffsetCommit failed for group %s due to group error (%s), will rejoin",
                          "g1", "[Error 22] IllegalGenerationError: g1")
        coordinator.error("Unexpected error in coordinator routine")
        logging.getLogger("aiokafka.conn").error("Unable to connect, will rejoin the party")  # another logger
        configure_logging("INFO", stream=out)  # configuring twice adds the filter once
        assert len([f for f in coordinator.filters if type(f).__name__ == "_RebalanceIsNotAnError"]) == 1
    finally:
        configure_logging("INFO")
    assert _levels(out) == [
        ("warning", "OffsetCommit failed for group g1 due to group error ([Error 22] IllegalGenerationError: g1), "
                    "will rejoin"),
        ("error", "Unexpected error in coordinator routine"),
        ("error", "Unable to connect, will rejoin the party"),
    ]
