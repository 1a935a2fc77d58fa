"""Every performance figure in one run, one table, written to benchmarks/results.md.

Each row compares ours with a baseline measured in the same run (a plain copy, Mosquitto's own
C clients, the same epochs in a plain torch loop), or states a size. Steps, in order:
codec, model transfer, aggregation memory, end-to-end overhead (10 and 25 nodes, with the
25-node federation's start-up and memory), simulated federations, secure aggregation (plain and
secure rounds of simulated sites through the broker).

    python -m benchmarks.run_all            # the full set (about 20-30 minutes on 2 cores)
    python -m benchmarks.run_all --quick    # smaller sizes, for a smoke run (a few minutes)
    python -m benchmarks.run_all --steps e2e simulation   # some steps; other rows kept, marked
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import subprocess
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

RESULTS = Path(__file__).with_name("results.md")


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "?")
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    mosq = subprocess.run(["mosquitto", "-h"], capture_output=True, text=True).stdout.splitlines()[:1]
    return (f"{platform.node()}: {os.cpu_count()} cores ({cpu}), {mem_gb:.0f} GiB, Linux {platform.release()}, "
            f"Python {platform.python_version()}, {mosq[0] if mosq else 'mosquitto ?'}")


Row = tuple[str, str, str, str]


def _codec(quick: bool) -> list[Row]:
    from benchmarks import codec

    return [(f"codec {r['mb']} MB tensor: encode / decode", f"{r['encode_gb_s']:.2f} / {r['decode_gb_s']:.2f} GB/s",
             f"plain copy {r['copy_gb_s']:.2f} GB/s", f"decode {r['decode_vs_copy']:.2f}x a copy")
            for r in codec.measure((1, 10, 100), repeat=3)]


def _transfer(quick: bool) -> list[Row]:
    from benchmarks import transfer

    rows: list[Row] = []
    for r in transfer.measure([10, 100] if quick else [10, 100, 500]):
        rows.append((f"model transfer {r['mb']} MB (signed, chunked, TLS)", f"{r['ours_mb_s']:.0f} MB/s",
                     f"C clients {r['c_chunked_mb_s']:.0f} MB/s chunked"
                     + (f", {r['c_single_mb_s']:.0f} MB/s one message" if r["mb"] <= 200 else ""),
                     f"{r['ratio']:.0%} of C (target >= 80%); receiver peak {r['receiver_extra_copies']:.1f} payload copies"))
        rows.append((f"model transfer {r['mb']} MB, sealed end to end", f"{r['sealed_mb_s']:.0f} MB/s", "same C clients",
                     f"{r['sealed_ratio']:.0%} of C (target >= 80%); receiver peak "
                     f"{r['sealed_receiver_extra_copies']:.1f} payload copies"))
    return rows


def _aggregation(quick: bool) -> list[Row]:
    from benchmarks import aggregation_memory

    return [(f"FedAvg memory, {r['n']} updates of 10 MB", f"{r['peak_above_base_mb']:.0f} MB above baseline",
             "target < 100 MB at N = 1000", f"{r['model_sizes']:.1f} model sizes; {r['seconds']:.1f} s")
            for r in aggregation_memory.measure([10, 100] if quick else [10, 100, 1000])]


def _e2e(quick: bool) -> list[Row]:
    from benchmarks import e2e

    rows: list[Row] = []
    for r in [e2e.run(n, 3 if quick else 5) for n in ([10] if quick else [10, 25])]:
        rows.append((f"end-to-end, {r['n']} nodes (MLP 784-128-10, 1 epoch/round)", f"{r['wall_s']:.1f} s wall",
                     f"pure compute {r['compute_s']:.1f} s", f"{r['ratio']:.2f}x (target <= 1.2x at 25)"))
        rows.append((f"{r['n']}-node federation: start-up", f"{r['startup_s']:.1f} s all connected, aggregator online {r['aggregator_online_s']:.1f} s, {r['ready_s']:.1f} s warm",
                     "target: 25 connected within 10 s", ""))
        parts = ", ".join(f"{role} {v['sum_mb'] / 1e3:.2f}" for role, v in r["pss_parts"].items())
        rows.append((f"{r['n']}-node federation: memory (one training template for the host)",
                     f"PSS {r['peak_pss_gb']:.2f} GB (RSS {r['peak_rss_gb']:.2f} GB)",
                     "target: PSS <= 4 GB at 25 (whole process tree, peak)", f"GB by role: {parts}"))
    return rows


def _simulation(quick: bool) -> list[Row]:
    from benchmarks import simulation

    target = "target <= 10 s a round at 10,000 (1 ms per node)"
    return [(f"simulated federation, {r['n']} nodes, tiny model", "FAILED", target, r["failed"]) if "failed" in r else
            (f"simulated federation, {r['n']} nodes, tiny model", f"{r['round_s']:.2f} s a round",
             f"connect {r['connect_s']:.1f} s; {target}",
             f"{r['per_node_ms']:.2f} ms per node per round; process RSS {r['fleet_rss_mb']:.0f} MB with N connected")
            for r in simulation.measure([100, 1000] if quick else [100, 1000, 10000], 3)]


def _secagg(quick: bool) -> list[Row]:
    """One row per N from benchmarks/secagg_broker.py's (plain, secure) pairs."""
    from benchmarks import secagg_broker

    sa = secagg_broker.table([10, 25] if quick else [10, 25, 100], rounds=4, pairs=1 if quick else 2)
    rows: list[Row] = []
    for plain, secure in zip(sa[::2], sa[1::2], strict=True):
        rows.append((f"secure aggregation, {secure['n']} simulated sites (k = {secure['k']}), MLP 25 450 parameters",
                     f"{secure['round_s']:.3f} s a round; a site sends {secure['site_kib']:.1f} KiB, "
                     f"{secure['site_cpu_ms']:.1f} ms CPU",
                     f"plain {plain['round_s']:.3f} s, {plain['site_kib']:.1f} KiB, {plain['site_cpu_ms']:.1f} ms; "
                     f"target <= 2x at 25", f"{secure['round_s'] / plain['round_s']:.2f}x; broker -> sites "
                     f"{secure['fanout_mib']:.2f} vs {plain['fanout_mib']:.2f} MiB a round; load average "
                     f"{(plain['load'] + secure['load']) / 2:.1f}"))
    return rows


# step -> (how to measure it, how its rows start: to keep the other steps' rows of an earlier run)
STEPS = {
    "codec": (_codec, ("codec ",)),
    "transfer": (_transfer, ("model transfer ",)),
    "aggregation": (_aggregation, ("FedAvg memory",)),
    "e2e": (_e2e, ("end-to-end", "10-node", "25-node")),
    "simulation": (_simulation, ("simulated federation",)),
    "secagg": (_secagg, ("secure aggregation",)),
}


def collect(quick: bool, steps: list[str] | None = None) -> list[Row]:
    """(what, ours, baseline / target, verdict) rows of `steps` (all by default)."""
    from common.logging import configure_logging

    configure_logging("warning")
    rows: list[Row] = []
    for name in steps or list(STEPS):
        try:
            rows.extend(STEPS[name][0](quick))
        except Exception as exc:  # noqa: BLE001 - one failed step must not lose the others' figures
            rows.append((f"{STEPS[name][1][0]}... (step {name})", "FAILED", f"{type(exc).__name__}: {exc}"[:200], ""))
    return rows


def _earlier_rows(steps: list[str]) -> list[Row]:
    """The rows of the steps not run now, from the results.md of an earlier run (marked as such)."""
    if not RESULTS.exists():
        return []
    text = RESULTS.read_text()
    when = text.split("Run on ", 1)[1].split(" by ", 1)[0] if "Run on " in text else "an earlier run"
    skipped = tuple(prefix for name, (_, prefixes) in STEPS.items() if name not in steps for prefix in prefixes)
    rows: list[Row] = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].startswith(skipped) and "(run of" not in cells[0]:
            rows.append((f"{cells[0]} (run of {when})", cells[1], cells[2], cells[3]))
        elif len(cells) == 4 and cells[0].startswith(skipped):
            rows.append(tuple(cells))  # type: ignore[arg-type]
    return rows


def write(rows: list[Row], seconds: float, quick: bool, steps: list[str], load: tuple[float, float]) -> str:
    partial = sorted(steps) != sorted(STEPS)
    command = "python -m benchmarks.run_all" + (" --quick" if quick else "") + (f" --steps {' '.join(steps)}" if partial else "")
    lines = [
        "# fedbiomq benchmark results",
        "",
        f"Run on {dt.datetime.now().strftime('%Y-%m-%d %H:%M')} by `{command}` ({seconds / 60:.0f} min).",
        "",
        f"Machine: {machine()}",
        "",
        f"Load average (1 min) at the start and the end of the run: {load[0]:.1f} / {load[1]:.1f}"
        + (" -- the machine was shared with other work: absolute times are noisy, ratios within the run less so."
           if max(load) > os.cpu_count() else ""),
        "",
        "Every ratio compares two figures measured in this same run."
        + (" Rows marked \"(run of ...)\" are kept from an earlier run (steps not run now)." if partial else ""),
        "",
        "| what | ours | baseline / target | ratio, notes |",
        "|---|---|---|---|",
        *[f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows],
        "",
    ]
    RESULTS.write_text("\n".join(lines))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller sizes (smoke run)")
    parser.add_argument("--steps", nargs="+", choices=list(STEPS), default=list(STEPS),
                        help="run only these steps; the other rows are kept from the last results.md, marked")
    args = parser.parse_args()
    start, load_start = time.perf_counter(), os.getloadavg()[0]
    rows = collect(args.quick, args.steps)
    ordered = [*_earlier_rows(args.steps), *rows]
    write(ordered, time.perf_counter() - start, args.quick, args.steps, (load_start, os.getloadavg()[0]))
    table = Table("what", "ours", "baseline / target", "ratio, notes", title="fedbiomq benchmarks")
    for row in ordered:
        table.add_row(*row)
    Console().print(table)
    print(f"written to {RESULTS}")


if __name__ == "__main__":
    main()
