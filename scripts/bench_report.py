#!/usr/bin/env python3
"""Turns the JSON lines the benchmarks append (benchkit::record) into
bench/results.json, BENCHMARKS.md and bench/ratios.png.

Usage: scripts/bench_report.py RESULTS_JSONL MODE SECONDS_JSON
"""
import datetime
import json
import os
import platform
import sys


def machine():
    cores = os.cpu_count()
    mem_kib = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cores": cores,
        "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "cpu": cpu,
        "os": platform.platform(),
    }


def fmt(x):
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.2f}"


def chart(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results if r["goal"] != "-"]
    fig, ax = plt.subplots(figsize=(10, 0.55 * len(rows) + 1.5))
    names = [r["name"] for r in rows]
    ratios = [r["ratio"] for r in rows]
    colors = ["tab:green" if r["meets_goal"] else "tab:red" for r in rows]
    y = list(range(len(rows)))
    ax.barh(y, ratios, color=colors, alpha=0.8)
    for i, r in enumerate(rows):
        goal = float(r["goal"].split()[1])
        ax.plot([goal, goal], [i - 0.4, i + 0.4], color="black", linewidth=2)
        ax.text(r["ratio"], i, f" {r['ratio']:.2f} (goal {r['goal']})", va="center", fontsize=8)
    ax.set_yticks(y)
    ax.set_yticklabels(names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("ratio ours / baseline (same run); black bar = goal; green = met, red = missed")
    ax.set_title("brighter-rs: cost against the raw clients")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    jsonl, mode, seconds_path = sys.argv[1], sys.argv[2], sys.argv[3]
    results = [json.loads(line) for line in open(jsonl) if line.strip()]
    # A scenario recorded twice is a bench that ran where it should only have
    # been counted (a profiler's run appending to the results).
    names = [r["name"] for r in results]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        sys.exit("recorded more than once: " + "; ".join(twice))
    seconds = json.load(open(seconds_path))
    os.makedirs("bench", exist_ok=True)
    info = machine()
    with open("bench/results.json", "w") as f:
        json.dump(results, f, indent=2)
        f.write("\n")
    lines = [
        "# Benchmarks",
        "",
        "Written by `scripts/bench`"
        + (" --quick" if mode == "quick" else "")
        + f" on {datetime.date.today().isoformat()}. Every figure is ours against a "
        "baseline written with the raw clients and measured in the same run on the "
        "same services (shared machines are noisy: only the ratio is comparable "
        "between runs). The figures are in `bench/results.json`, the chart in "
        "`bench/ratios.png`.",
        "",
        f"Machine: {info['cores']} cores, {info['memory_gib']} GiB memory, {info['cpu']}; "
        f"{info['os']}. Brokers and Postgres run on the same machine as the benchmarks.",
        "",
        "| scenario | ours | baseline | unit | ratio | goal | met |",
        "|---|---:|---:|---|---:|---|---|",
    ]
    for r in results:
        met = {True: "yes", False: "**no**", None: "-"}[r["meets_goal"]]
        lines.append(
            f"| {r['name']} | {fmt(r['ours'])} | {fmt(r['baseline'])} | {r['unit']} | "
            f"{r['ratio']:.2f} | {r['goal']} | {met} |"
        )
    lines += ["", "Notes per scenario:", ""]
    for r in results:
        lines.append(f"- {r['name']}: {r['note']}")
    lines += ["", "Time per benchmark binary (seconds, excluding the build):", ""]
    for name, secs in seconds.items():
        lines.append(f"- {name}: {secs}")
    missed = [r["name"] for r in results if r["meets_goal"] is False]
    lines += ["", f"Goals missed: {len(missed)} of {sum(1 for r in results if r['meets_goal'] is not None)}."]
    if missed:
        lines += ["See \"Where goals are missed\" below."]
    lines.append("")
    notes_path = "bench/NOTES.md"
    if os.path.exists(notes_path):
        lines += [open(notes_path).read().rstrip(), ""]
    with open("BENCHMARKS.md", "w") as f:
        f.write("\n".join(lines))
    chart(results, "bench/ratios.png")
    print(f"wrote bench/results.json, BENCHMARKS.md, bench/ratios.png ({len(results)} results)")


if __name__ == "__main__":
    main()
