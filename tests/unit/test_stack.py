"""Pure helpers of the local stack command."""

from __future__ import annotations

import uuid

import pytest

from clickhouse_etl.dev import stack


def test_kafka_cluster_id_never_starts_with_a_dash(monkeypatch: pytest.MonkeyPatch) -> None:
    # 0xF8 encodes to "-" in URL-safe base64: the storage tool would read such an id as an option.
    drawn = iter([uuid.UUID(bytes=b"\xf8" + bytes(15)), uuid.UUID(bytes=b"\x07" + bytes(15))])
    monkeypatch.setattr(stack.uuid, "uuid4", lambda: next(drawn))
    cluster_id = stack._kafka_cluster_id()
    assert cluster_id == "BwAAAAAAAAAAAAAAAAAAAA"
    assert len(cluster_id) == 22
