"""The summary table: one row per figure and store, sagaline next to the baseline, ratio, target."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def rows(lines: list[dict[str, Any]]) -> list[tuple[str, str, str, str, str, str]]:
    out = []
    for d in lines:
        if "peer" in d:  # DBOS, celery-saga: bench/peers.py prints them beside ours
            continue
        f, s, t = d["figure"], d["store"], d.get("target", "")
        if f in ("L1", "L2"):
            out.append(
                (
                    f,
                    s,
                    f"{d['sagaline_median_ms']:.1f} / {d['sagaline_p95_ms']:.1f} ms",
                    f"{d['baseline_median_ms']:.1f} / {d['baseline_p95_ms']:.1f} ms",
                    f"{d['ratio_median']:.2f} / {d['ratio_p95']:.2f}",
                    t,
                )
            )
        elif f == "T1":
            out.append(
                (
                    f,
                    s,
                    f"{d['sagaline_per_s']:.0f}/s ({d['sagaline_seconds']:.2f}s)",
                    f"{d['baseline_per_s']:.0f}/s ({d['baseline_seconds']:.2f}s)",
                    f"{d['ratio_throughput']:.2f}",
                    t,
                )
            )
        elif f == "G1":
            out.append(
                (
                    f,
                    s,
                    f"get() {d['median_ms']:.2f} / p90 {d['p90_ms']:.2f} / p99 "
                    f"{d['p99_ms']:.2f} ms after the commit; reads/get max "
                    f"{d['reads_per_get_max']} (mean {d['reads_per_get_mean']:.2f})",
                    "",
                    "",
                    t,
                )
            )
        elif f == "S1":
            sl = "  ".join(f"{n}:{v['sagaline_ms_per_step']:.2f}" for n, v in d["lengths"].items())
            bl = "  ".join(f"{n}:{v['baseline_ms_per_step']:.2f}" for n, v in d["lengths"].items())
            out.append(
                (
                    f,
                    s,
                    f"ms/step {sl} (growth {d['sagaline_growth']:.2f})",
                    f"ms/step {bl} (growth {d['baseline_growth']:.2f})",
                    f"{d['ratio_at_max']:.2f} at max",
                    t,
                )
            )
        elif f == "H1":
            out.append(
                (
                    f,
                    s,
                    f"L1 {d['l1_sagaline_median_ms']:.1f} ms ({d['l1_vs_empty']:.2f}x"
                    f" empty); T1 {d['t1_sagaline_per_s']:.0f}/s "
                    f"({d['t1_vs_empty']:.2f}x empty); list50 "
                    f"{d['list_compensated_50_median_ms']:.2f} ms",
                    f"history {d['history']:,} (load {d['load_seconds']:.0f}s)",
                    f"L1 {d['l1_ratio_to_baseline']:.2f} / T1 {d['t1_ratio_to_baseline']:.2f}",
                    t,
                )
            )
        elif f == "VOL":
            out.append(
                (
                    f,
                    s,
                    f"drop month {d['drop_month_seconds']:.3f} s; L1 "
                    f"{d['l1_median_ms']:.1f} ms ({d['l1_vs_empty']:.2f}x empty); T1 "
                    f"{d['t1_per_s']:.0f}/s ({d['t1_slowdown_vs_empty']:.2f}x empty's time); "
                    f"list50 failed {d['list_failed_50_median_ms']:.2f} ms",
                    f"{d['events']:,} events (generated in {d['generation_seconds']:.0f}s)",
                    "",
                    t,
                )
            )
        elif f == "R1":
            out.append(
                (
                    f,
                    s,
                    f"{d['sql_statements_per_step']:.2f} SQL, "
                    f"{d['transactions_per_step']:.2f} tx, "
                    f"{d['sagaline_messages_per_step']:.2f} msg, "
                    f"{d['sagaline_redis_commands_per_step']:.1f} redis cmds /step; "
                    f"run(): {d['caller_sql_per_run']:.1f} SQL",
                    f"{d['baseline_messages_per_step']:.2f} msg, "
                    f"{d['baseline_redis_commands_per_step']:.1f} redis cmds /step",
                    "",
                    t,
                )
            )
        elif f == "OBS":
            out.append(
                (
                    f,
                    s,
                    _obs_side(d, "on"),
                    _obs_side(d, "off"),
                    f"wall L1 {d['l1_overhead']:.3f} / T1 {d['t1_overhead']:.3f}"
                    f" ({'holds' if d['within_target'] else 'exceeds'}); CPU L1 "
                    f"{d['l1_cpu_overhead']:.3f} / T1 {d['t1_cpu_overhead']:.3f}"
                    f" ({'holds' if d['cpu_within_target'] else 'exceeds'})",
                    t,
                )
            )
        elif f == "MEM":
            out.append(
                (
                    f,
                    s,
                    f"{d['sagaline_total_kb'] / 1024:.0f} MiB (child "
                    f"{d['sagaline_max_child_kb'] / 1024:.0f})",
                    f"{d['baseline_total_kb'] / 1024:.0f} MiB (child "
                    f"{d['baseline_max_child_kb'] / 1024:.0f})",
                    f"{d['ratio_total']:.2f}",
                    t,
                )
            )
    return out


def _obs_side(d: dict[str, Any], side: str) -> str:
    l1_cpu, t1_cpu = d[f"l1_{side}_cpu_ms"]["total_ms"], d[f"t1_{side}_cpu_ms"]["total_ms"]
    return (
        f"{side}: L1 {d[f'l1_{side}_median_ms']:.1f} ms, T1 {d[f't1_{side}_per_s']:.0f}/s; "
        f"CPU/saga {l1_cpu:.2f} / {t1_cpu:.2f} ms"
    )


def print_table(lines: list[dict[str, Any]]) -> None:
    header = ("figure", "store", "sagaline", "baseline (plain Celery)", "ratio", "target")
    print_rows("sagaline vs plain Celery (ratios are sagaline / baseline)", header, rows(lines))


def print_rows(title: str, header: Sequence[str], data: Sequence[Sequence[str]]) -> None:
    """A table on stdout: Rich's, or plain columns where Rich is missing."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(r[i]) for r in [header, *data]) for i in range(len(header))]
        for r in [header, *data]:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
        return
    table = Table(title=title)
    for h in header:
        table.add_column(h, overflow="fold")
    for r in data:
        table.add_row(*r)
    Console(width=200).print(table)
