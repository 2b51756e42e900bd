"""What the run was (machine, load, versions) and the table it prints:
one row per measure, one column per consumer, and how far walrelay (exactly
once, its default) is ahead of Debezium: Debezium's figure over walrelay's
where lower is better, walrelay's over Debezium's where higher is better,
so above 1 always means walrelay is ahead."""

import os
import platform
import re
import subprocess

COLUMNS = [("walrelay-eo", "walrelay, exactly once"), ("walrelay-alo", "walrelay, at least once"),
           ("debezium", "Debezium"), ("pg_recvlogical", "pg_recvlogical")]


def machine():
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            model = re.search(r"model name\s*:\s*(.+)", f.read()).group(1)
    except Exception:
        pass
    return {"cores": os.cpu_count(), "cpu": model, "kernel": platform.release(),
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}


def uptime():
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except Exception:
        return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def version(cmd):
    try:
        out = subprocess.run(cmd, capture_output=True, text=True)
        return (out.stdout or out.stderr).strip().splitlines()[0]
    except Exception:
        return "unknown"


def _fmt(value, unit):
    if value is None:
        return "-"
    if unit == "s":
        return f"{value:.2f} s"
    if unit == "ms":
        return f"{value:,.1f} ms" if value < 10 else f"{value:,.0f} ms"
    if unit == "MiB":
        return f"{value:,.0f} MiB"
    if unit == "cpu":
        return f"{value:.2f} s"
    if unit == "/s":
        return f"{value:,.0f}/s"
    return f"{value:,}"


def _ahead(walrelay, debezium, lower_is_better):
    if walrelay is None or debezium is None:
        return "-"
    if lower_is_better:
        if walrelay == 0:
            return "even" if debezium == 0 else f"ahead ({debezium:,} vs 0)"
        ratio = debezium / walrelay
    else:
        if debezium == 0:
            return "-"
        ratio = walrelay / debezium
    text = f"{ratio:.2f}x" if ratio < 10 else f"{ratio:.0f}x"
    return f"**{text}**" if ratio >= 1 else f"{text} (behind)"


def rows(results):
    """(measure, {peer: value}, unit, lower_is_better) for every row."""
    out = []
    for d in results.get("drain", []):
        n = f"{d['events']:,}"
        p = d["peers"]
        get = lambda k: {name: v.get(k) for name, v in p.items()}  # noqa: E731
        out.append((f"drain {n} events: start to last event in Kafka", get("start_to_last_s"), "s", True))
        out.append((f"drain {n} events: events/s once streaming", get("events_per_second"), "/s", False))
        out.append((f"drain {n} events: CPU per 100,000 events", get("cpu_seconds_per_100k"), "cpu", True))
        out.append((f"drain {n} events: peak RSS", get("peak_rss_mib"), "MiB", True))
    for s in results.get("steady", []):
        p = s["peers"]
        for k, label in (("p50_ms", "p50"), ("p99_ms", "p99"), ("max_ms", "max")):
            out.append((f"steady {s['rate']:,} events/s: commit to readable by a read_committed consumer {label}",
                        {n: v["visible_to_consumer"][k] for n, v in p.items()}, "ms", True))
        for k, label in (("p50_ms", "p50"), ("p99_ms", "p99")):
            out.append((f"steady {s['rate']:,} events/s: commit to broker append {label}", {n: v[k] for n, v in p.items()}, "ms", True))
        out.append((f"steady {s['rate']:,} events/s: CPU per 100,000 events", {n: v["cpu_seconds_per_100k"] for n, v in p.items()}, "cpu", True))
    sat = results.get("saturated")
    if sat:
        p = sat["peers"]
        label = f"saturated ({sat['clients']} clients, {sat['seconds']} s; alone: {sat['no_consumer_tps']:,}/s)"
        out.append((f"{label}: commits/s while streaming", {n: v["commits_per_second"] for n, v in p.items()}, "/s", False))
        out.append((f"{label}: events/s written and in Kafka (until the consumer caught up)",
                    {n: v["delivered_per_second"] for n, v in p.items()}, "/s", False))
        out.append((f"{label}: CPU per 100,000 events", {n: v["cpu_seconds_per_100k"] for n, v in p.items()}, "cpu", True))
        out.append((f"{label}: peak RSS", {n: v["peak_rss_mib"] for n, v in p.items()}, "MiB", True))
    st = results.get("startup")
    if st:
        out.append(("process start to first event in Kafka", {n: v["first_event_ms"] for n, v in st["peers"].items()}, "ms", True))
    c = results.get("crash")
    if c:
        p = c["peers"]
        label = f"kill -9 under {c['rate']:,} events/s"
        out.append((f"{label}: restart to the first event committed after the kill", {n: v["resume_ms"] for n, v in p.items()}, "ms", True))
        out.append((f"{label}: duplicates", {n: v["duplicates"] for n, v in p.items()}, "", True))
    return out


def table(results):
    present = [c for c in COLUMNS if any(c[0] in r[1] for r in rows(results))]
    compare = any(c[0] == "debezium" for c in present)
    head = ["measure"] + [label for _, label in present] + (["walrelay ahead by"] if compare else [])
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for measure, values, unit, lower in rows(results):
        cells = [measure] + [_fmt(values.get(name), unit) for name, _ in present]
        if compare:
            cells.append(_ahead(values.get("walrelay-eo"), values.get("debezium"), lower))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def walrelay_only(results):
    lines = []
    for r in results.get("recovery", []):
        lines.append(f"- kill -9 and restart, exactly once, {r['partitions']} partitions ({r.get('topics', 1)} topics, "
                     f"{r['earlier_events']:,} earlier events): "
                     f"first new event {r['first_event_ms']} ms, new events in every partition {r['all_partitions_ms']} ms")
    for d in results.get("scale", []):
        eo, pg = d["peers"].get("walrelay-eo"), d["peers"]["pg_recvlogical"]
        if eo:
            lines.append(f"- scale, exactly once, {d['events']:,} events: {eo['start_to_last_s']} s "
                         f"({eo['events_per_second']:,}/s), CPU {eo['cpu_seconds_per_100k']} s per 100,000 events "
                         f"(pg_recvlogical {pg['cpu_seconds_per_100k']} s, ratio "
                         f"{eo['cpu_seconds_per_100k'] / pg['cpu_seconds_per_100k']:.2f}), peak RSS {eo['peak_rss_mib']} MiB")
    poll = results.get("poll")
    if poll:
        d = poll["drain"]
        wal = next((x["peers"]["walrelay-eo"]["events_per_second"] for x in results.get("drain", [])
                    if "walrelay-eo" in x["peers"]), None)
        lines.append(f"- --source poll: drained {d['events']:,} rows at {d['events_per_second']:,} rows/s"
                     + (f" (the WAL source once streaming: {wal:,} events/s, ratio {d['events_per_second'] / wal:.2f})" if wal else "")
                     + f"; peak RSS {d['peak_rss_mib']} MiB, CPU {d['cpu_seconds_per_100k']} s per 100,000 rows")
        s = poll.get("steady")
        if s:
            lines.append(f"- --source poll, steady {s['rate']:,} events/s: insert to broker p50 / p99 / max "
                         f"{s['p50_ms']} / {s['p99_ms']} / {s['max_ms']} ms")
    return "\n".join(lines)


def human(results):
    m = results["machine"]
    v = results["versions"]
    parts = [
        f"walrelay benchmark, {results['date']}: `{results['command']}` ({results['elapsed_minutes']} min)",
        f"machine: {m['cores']} cores ({m['cpu']}), {m['memory_gib']} GiB, Linux {m['kernel']}",
        f"load before: {results['load_before']}",
        f"load after:  {results['load_after']}",
        "versions: " + "; ".join(f"{k} {val}" for k, val in v.items()),
    ]
    if rows(results):
        parts += ["", table(results)]
    extra = walrelay_only(results)
    if extra:
        parts += ["", "walrelay only:", extra]
    return "\n".join(parts)
