"""Where every partition stands: watermarks, committed end, lag, ranges in flight or failed, gaps, overlaps."""

from __future__ import annotations

from dataclasses import dataclass, field

from clickhouse_etl.core.ledger import PartitionLedger
from clickhouse_etl.core.ranges import OffsetRange


@dataclass
class PartitionOffsets:
    partition: int
    low: int
    high: int
    committed_end: int | None
    in_flight: list[OffsetRange] = field(default_factory=list)
    failed: list[OffsetRange] = field(default_factory=list)
    gaps: list[tuple[int, int]] = field(default_factory=list)
    overlaps: list[tuple[OffsetRange, OffsetRange]] = field(default_factory=list)

    @property
    def lag(self) -> int:
        return self.high - (self.low if self.committed_end is None else self.committed_end)

    @property
    def healthy(self) -> bool:
        return not self.gaps and not self.overlaps


def partition_offsets(
    watermarks: dict[int, tuple[int, int]], ledgers: dict[int, PartitionLedger]
) -> list[PartitionOffsets]:
    """Combine watermarks and the ledger; offsets that expired before being committed count as a gap."""
    report = []
    for partition, (low, high) in sorted(watermarks.items()):
        entry = ledgers.get(partition)
        if entry is None:
            report.append(PartitionOffsets(partition, low, high, None))
            continue
        committed_end = entry.committed_end
        gaps = entry.gaps()
        if committed_end is not None and committed_end < low:
            gaps.append((committed_end, low))  # never processed, and gone from Kafka
        report.append(
            PartitionOffsets(
                partition,
                low,
                high,
                committed_end,
                in_flight=sorted(entry.in_flight),
                failed=sorted(entry.failed),
                gaps=gaps,
                overlaps=entry.overlaps(),
            )
        )
    return report


def format_offsets(topic: str, report: list[PartitionOffsets]) -> str:
    header = f"{'partition':>9} {'low':>10} {'high':>10} {'committed':>10} {'lag':>10}  in flight / failed / problems"
    lines = [f"topic {topic}", header]
    for p in report:
        notes = []
        if p.in_flight:
            notes.append("in flight " + ", ".join(f"[{r.start}, {r.end})" for r in p.in_flight))
        if p.failed:
            notes.append("failed, awaiting retry " + ", ".join(f"[{r.start}, {r.end})" for r in p.failed))
        notes += [f"GAP [{a}, {b})" for a, b in p.gaps]
        notes += [f"OVERLAP [{a.start}, {a.end}) ~ [{b.start}, {b.end})" for a, b in p.overlaps]
        committed = "-" if p.committed_end is None else str(p.committed_end)
        lines.append(
            f"{p.partition:>9} {p.low:>10} {p.high:>10} {committed:>10} {p.lag:>10}  {'; '.join(notes) or 'ok'}"
        )
    return "\n".join(lines)
