#!/usr/bin/env python3
"""
Plot fan-out results: max sustainable deliveries/s and the p99 latency at that rate,
against the number of subscribers, one line per server (median of the repetitions,
bars from the lowest to the highest).

    python3 benchmarks/run.py --scenario fanout --subs 100,300,1000
    python3 benchmarks/plot.py                      # the latest run with fanout results
    python3 benchmarks/plot.py --run-id 20261128-140000 --out docs/performance-fanout.png
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

STYLE = {"roombus": ("C0", "o"), "websockets-peer": ("C1", "s"), "trio-websocket-peer": ("C2", "^")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("results", nargs="*", default=[str(HERE / "results" / "results.jsonl")])
    ap.add_argument(
        "--run-id",
        action="append",
        default=[],
        help="runs to plot (repeatable); default: the latest run with fanout records",
    )
    ap.add_argument("--out", default=str(HERE.parent / "docs" / "performance-fanout.png"))
    ap.add_argument("--title", default="")
    a = ap.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    records = []
    for path in a.results:
        with open(path) as f:
            records += [json.loads(ln) for ln in f if ln.strip()]
    records = [r for r in records if r["scenario"] == "fanout" and r["result"].get("ok")]
    if not records:
        print("no fanout results found", file=sys.stderr)
        return 1
    runs = a.run_id or [max(r["run_id"] for r in records)]
    records = [r for r in records if r["run_id"] in runs]

    # server -> subs -> [(deliveries/s, p99 ms)]
    data: dict[str, dict[int, list[tuple[float, float]]]] = {}
    for r in records:
        res = r["result"]
        data.setdefault(r["server"], {}).setdefault(res["subs"], []).append(
            (res["max_sustainable_deliveries_per_s"], res.get("p99_ms") or 0.0)
        )

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.4))
    for server, by_subs in sorted(
        data.items(), key=lambda kv: list(STYLE).index(kv[0]) if kv[0] in STYLE else 99
    ):
        color, marker = STYLE.get(server, (None, "x"))
        xs = sorted(by_subs)
        for ax, idx, scale in ((ax1, 0, 1e3), (ax2, 1, 1.0)):
            vals = [[v[idx] / scale for v in by_subs[x]] for x in xs]
            med = [statistics.median(v) for v in vals]
            lo = [m - min(v) for m, v in zip(med, vals, strict=True)]
            hi = [max(v) - m for m, v in zip(med, vals, strict=True)]
            ax.errorbar(
                xs,
                med,
                yerr=[lo, hi],
                color=color,
                marker=marker,
                capsize=3,
                label=server,
                linewidth=1.6,
            )
    ax1.set_title("max sustainable deliveries/s\n(nothing lost, p99 <= 100 ms)")
    ax1.set_ylabel("thousand deliveries per second (log scale)")
    ax2.set_title("p99 latency at that rate")
    ax2.set_ylabel("ms")
    ax2.axhline(100, color="grey", linestyle=":", linewidth=1)
    for ax in (ax1, ax2):
        ax.set_xscale("log")
        ax.set_xlabel("subscribers in the room")
        xs_all = sorted({x for d in data.values() for x in d})
        ax.set_xticks(xs_all)
        ax.set_xticklabels([str(x) for x in xs_all])
        ax.minorticks_off()
        ax.grid(True, alpha=0.3)
    ax1.set_yscale("log")
    ax1.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax2.set_ylim(bottom=0)
    ax1.legend(loc="best", fontsize=9)
    reps = max(len(v) for d in data.values() for v in d.values())
    fig.suptitle(
        a.title
        or f"fan-out in one room (median of up to {reps} runs; bars: min-max)\n"
        f"runs {', '.join(runs)}",
        fontsize=10,
    )
    fig.tight_layout()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(a.out, dpi=110)
    print(a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
