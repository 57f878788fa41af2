"""The comparison report of TFLite variants: rows as data (report.json) and as a Markdown table (report.md)."""
from __future__ import annotations

COLUMNS = ("variant", "size", "size vs f32", "accuracy", "Δ accuracy", "p50 latency", "speed vs f32",
           "p95 latency", "throughput", "blessed")


def _size(size_bytes: int) -> str:
    return f"{size_bytes / 1024:.1f} KiB" if size_bytes < 1024 * 1024 else f"{size_bytes / 1024 / 1024:.2f} MiB"


def complete_rows(rows: list[dict]) -> list[dict]:
    """Adds the ratios against float32 (size and speed) to measured rows."""
    reference = next((r for r in rows if r["variant"] == "float32" and r["status"] == "ok"), None)
    for row in rows:
        if row["status"] != "ok" or reference is None:
            continue
        row["size_vs_f32"] = row["size_bytes"] / reference["size_bytes"]
        row["speed_vs_f32"] = reference["latency_p50_ms"] / row["latency_p50_ms"] if row["latency_p50_ms"] else None
    return rows


def markdown(rows: list[dict], title: str = "") -> str:
    lines = [f"### {title}", ""] if title else []
    lines += ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        if row["status"] != "ok":
            lines.append(f"| {row['variant']} | failed: {row['error'][:120]} |" + " |" * (len(COLUMNS) - 2))
            continue
        ratio = row.get("size_vs_f32")
        speed = row.get("speed_vs_f32")
        lines.append(" | ".join([
            f"| {row['variant']}", _size(row["size_bytes"]), f"{ratio:.2f}x" if ratio else "-",
            f"{row['accuracy']:.4f}", f"{row['accuracy_delta_points']:+.2f} pts",
            f"{row['latency_p50_ms'] * 1000:.0f} µs", f"{speed:.2f}x" if speed else "-",
            f"{row['latency_p95_ms'] * 1000:.0f} µs", f"{row['throughput_per_s']:,.0f}/s",
            "yes" if row["blessed"] else "no"]) + " |")
    return "\n".join(lines) + "\n"
