"""Shared test set-up: the real Kafka-protocol broker fixture (tests/kafka_broker.py)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
pytest_plugins = ["kafka_broker"]
