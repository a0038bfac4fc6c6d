"""Sources and sinks of Arrow record batches: memory, Parquet, Arrow IPC, Kafka.

Installed as ``streamfact.connectors``. Connectors implement the protocols of
:mod:`streamfact.io` and know nothing of operators.
"""

from .arrow_ipc import ArrowIPCSink, ArrowIPCSource
from .kafka import KafkaSink, KafkaSource  # confluent-kafka is imported on first use
from .memory import MemorySink, MemorySource, fixed_size_list_array
from .parquet import ParquetSink, ParquetSource

__all__ = [
    "ArrowIPCSink",
    "ArrowIPCSource",
    "KafkaSink",
    "KafkaSource",
    "MemorySink",
    "MemorySource",
    "ParquetSink",
    "ParquetSource",
    "fixed_size_list_array",
]
