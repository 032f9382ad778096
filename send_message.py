#!/usr/bin/env python3
"""Publish a test world: a thin wrapper over `ai-worker send` (same flags).

    python send_message.py --prompt "A drowned city of lantern-lit canals" --users 3 --posts 6 \
        --kafka localhost:9092 --mongo mongodb://localhost:27017
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))

from ai_worker.cli import app

if __name__ == "__main__":
    app(args=["send", *sys.argv[1:]], prog_name="send_message.py")
