#!/usr/bin/env python3
"""Turns a perf/bench.sh result directory into a markdown table.

Usage: bench_report.py DIR > DIR/results.md

Reads DIR/machine.json, DIR/fio-*.json and the spate-perf --json files (one per run, named by
the run). Every throughput is also given as a ratio: against fio's sequential O_DIRECT write
bandwidth (MB/s) and against the same run on the peer broker (records/s). A produce run is
compared with the fio run made just before it (DIR/fio-near-RUN.json) when there is one, and
also with the one at the start of the suite.
"""
import json
import os
import sys


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def pct(fio_lat, key):
    p = (fio_lat or {}).get("percentile", {})
    v = p.get(key)
    return v / 1e6 if v is not None else None


def ms(v):
    return "-" if v is None else f"{v:.3f}"


def ratio(a, b):
    if not a or not b:
        return "-"
    return f"{a / b:.2f}x"


def main():
    if len(sys.argv) != 2 or not os.path.isdir(sys.argv[1]):
        sys.exit("usage: bench_report.py RESULT_DIR")
    out = sys.argv[1]
    machine = load(os.path.join(out, "machine.json")) or {}
    seq = load(os.path.join(out, "fio-seqwrite.json"))
    sync = load(os.path.join(out, "fio-syncwrite.json"))
    runs = {}
    for name in sorted(os.listdir(out)):
        if name.endswith(".json") and not name.startswith(("fio-", "machine")):
            r = load(os.path.join(out, name))
            if r and "records_per_sec" in r:
                runs[name[: -len(".json")]] = r

    lines = []
    add = lines.append
    add("### Machine")
    add("")
    add(
        f"{machine.get('cores', '?')} cores, {machine.get('cpu', '?')}, {machine.get('memory', '?')}"
        f" RAM, kernel {machine.get('kernel', '?')}; data on {machine.get('disk', '?')}"
        f" ({machine.get('filesystem', '?')}, rotational={machine.get('rotational', '?')});"
        f" {machine.get('secs_per_run', '?')} s per run."
    )
    add("")
    seq_mb = None
    add("### Disk limit (fio)")
    add("")
    add("| test | result |")
    add("|---|---|")
    if seq:
        w = seq["jobs"][0]["write"]
        seq_mb = w["bw_bytes"] / 1e6
        add(f"| sequential write, O_DIRECT, 1 MiB blocks, io_uring QD16 | {seq_mb:.1f} MB/s |")
    if sync:
        j = sync["jobs"][0]
        s = j.get("sync", {}).get("lat_ns")
        add(
            f"| 4 KiB write + fdatasync, O_DIRECT, QD1 | {j['write']['iops']:.0f} ops/s; fdatasync"
            f" p50 {ms(pct(s, '50.000000'))} ms, p99 {ms(pct(s, '99.000000'))} ms,"
            f" p99.9 {ms(pct(s, '99.900000'))} ms |"
        )
    add("")
    add("### Runs")
    add("")
    add(
        "| run | measured s | records/s | MB/s | fio just before (MB/s) | vs fio just before"
        " | vs fio at start | vs peer (records/s) | p50 ms | p99 ms | p99.9 ms | p99.99 ms | max ms |"
    )
    add("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in runs.items():
        peer = None
        if name.startswith("spate-"):
            rest = name[len("spate-"):]
            # The peer has no flush setting: compare against its one run of the same shape.
            for flush in ("-interval", "-always"):
                if rest.endswith(flush):
                    rest = rest[: -len(flush)] + "-sqlite"
            # Repeated e2e runs (spate-e2e-2, ...) compare with the peer's one e2e run.
            if rest.startswith("e2e-"):
                rest = "e2e"
            peer = runs.get("tansu-" + rest)
        lat = r["latency"]
        # Only produce writes: a read or an e2e rate has no meaning against a write limit.
        produce = r.get("mode") == "produce"
        near = load(os.path.join(out, f"fio-near-{name}.json"))
        near_mb = near["jobs"][0]["write"]["bw_bytes"] / 1e6 if near and produce else None
        add(
            f"| {name} | {r['seconds']:.1f} | {r['records_per_sec']:,.0f} | {r['mb_per_sec']:.1f}"
            f" | {'-' if near_mb is None else f'{near_mb:.1f}'}"
            f" | {ratio(r['mb_per_sec'], near_mb) if produce else '-'}"
            f" | {ratio(r['mb_per_sec'], seq_mb) if produce else '-'}"
            f" | {ratio(r['records_per_sec'], peer['records_per_sec'] if peer else None)}"
            f" | {ms(lat['p50_ms'])} | {ms(lat['p99_ms'])} | {ms(lat['p999_ms'])}"
            f" | {ms(lat['p9999_ms'])} | {ms(lat['max_ms'])} |"
        )
    lagged = [(n, r["send_lag"]) for n, r in runs.items() if r.get("send_lag")]
    if lagged:
        add("")
        add(
            "Send lag of the fixed-rate runs (how late spate-perf put each batch on the wire"
            " against its intended time; part of the latency above):"
        )
        for name, lag in lagged:
            add(
                f"- {name}: p50 {ms(lag['p50_ms'])} ms, p99 {ms(lag['p99_ms'])} ms,"
                f" p99.9 {ms(lag['p999_ms'])} ms, max {ms(lag['max_ms'])} ms"
            )
    add("")
    add(
        "Produce latency: from each request's send (or intended send, with --rate) to its ack."
        " Consume latency: fetch round trip. e2e latency: from the intended send to the fetch"
        " that returned the record. MB/s counts record values (produce) or batch bytes (consume,"
        " e2e). Percentiles come from hdrhistogram histograms merged across connections."
    )
    cluster_section(out, runs, seq_mb, add)
    print("\n".join(lines))


def median(xs):
    xs = sorted(xs)
    n = len(xs)
    if n == 0:
        return None
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


def cluster_section(out, runs, seq_mb, add):
    """The replicated section (perf/bench.sh cluster): ratios against the single-node rows of the
    same run and the disk, and the figures of issue 17 against their targets."""
    if not any(n.startswith("cluster-") for n in runs):
        return
    rps = lambda n: (runs.get(n) or {}).get("records_per_sec")
    add("")
    add("### Replicated (3 nodes, replication factor 3)")
    add("")
    add("| figure | value | against | ratio | target |")
    add("|---|---|---|---|---|")
    for acks, target in (("1", ""), ("-1", ">= 0.30x")):
        c, s1 = f"cluster-produce-1024B-acks{acks}-always", f"single-produce-1024B-acks{acks}-always"
        if c in runs:
            add(
                f"| produce 1 KiB acks={acks} always, RF 3 | {rps(c):,.0f} rec/s,"
                f" {runs[c]['mb_per_sec']:.1f} MB/s | single node {rps(s1) or 0:,.0f} rec/s"
                f" | {ratio(rps(c), rps(s1))} | {target} |"
            )
            if seq_mb:
                add(
                    f"| the same, bytes written (x3) against fio | {3 * runs[c]['mb_per_sec']:.1f} MB/s"
                    f" | fio {seq_mb:.1f} MB/s | {ratio(3 * runs[c]['mb_per_sec'], seq_mb)} | |"
                )
    for name in sorted(n for n in runs if n.startswith("cluster-e2e")):
        lat = runs[name]["latency"]
        add(
            f"| {name} at {runs[name]['records_per_sec']:,.0f} rec/s | p99 {ms(lat['p99_ms'])} ms,"
            f" p99.9 {ms(lat['p999_ms'])} ms, max {ms(lat['max_ms'])} ms | | | p99 <= 2, p99.9 <= 10 |"
        )
    fo = runs.get("cluster-failover")
    kills_path = os.path.join(out, "cluster-failover-kills.txt")
    if fo and os.path.exists(kills_path):
        kills = [int(l.split()[0]) for l in open(kills_path) if l.strip()]
        acks = sorted(f["first_ack_unix_ms"] for f in fo.get("failovers", []))
        recov = []
        for k in kills:
            after = [a for a in acks if a > k]
            if after:
                recov.append(after[0] - k)
        if recov:
            add(
                f"| failover: kill to first ack, {len(recov)} kills | median {median(recov) / 1e3:.2f} s,"
                f" max {max(recov) / 1e3:.2f} s | | | <= 1 s median, <= 2 s max |"
            )
        lat = fo["latency"]
        add(
            f"| failover run: latency at {fo['config'].get('rate', 0):,.0f} rec/s, {fo.get('retries', 0)}"
            f" retries, {fo.get('failover_time_ms', 0) / 1e3:.1f} s failing | p50 {ms(lat['p50_ms'])},"
            f" p99 {ms(lat['p99_ms'])}, p99.9 {ms(lat['p999_ms'])}, max {ms(lat['max_ms'])} ms | | | |"
        )
    for name, label in (("cluster-idle-empty", "idle, no topics"), ("cluster-idle-3000", "idle, 3,000 partitions RF 3")):
        r = load(os.path.join(out, name + ".json"))
        if r:
            cpu = ", ".join(f"{c:.1f}" for c in r["cpu_pct_of_one_core"])
            add(f"| {label}: CPU % of one core, nodes 1-3, {r['secs']} s | {cpu} | | | <= 5 each |")
    p6, p1000 = rps("cluster-produce-p6"), rps("cluster-produce-p1000")
    if p6 or p1000:
        add(
            f"| produce to 1,000 partitions vs 6 (acks=all), 6 KB vs 1 MB batches | {p1000 or 0:,.0f}"
            f" vs {p6 or 0:,.0f} rec/s | 6 partitions | {ratio(p1000, p6)} | >= 0.7x |"
        )
    # The same pair with the same batch size in both rows (BENCH_MANY_SHAPES).
    sizes = sorted({int(n.rsplit("-b", 1)[1]) for n in runs if n.startswith("cluster-produce-p6-b")})
    for b in sizes:
        q6, q1000 = rps(f"cluster-produce-p6-b{b}"), rps(f"cluster-produce-p1000-b{b}")
        if q6 or q1000:
            add(
                f"| produce to 1,000 partitions vs 6 (acks=all), {b // 1024} KiB batches in both"
                f" | {q1000 or 0:,.0f} vs {q6 or 0:,.0f} rec/s | 6 partitions | {ratio(q1000, q6)}"
                f" | >= 0.7x |"
            )
    cu = load(os.path.join(out, "cluster-catchup-result.json"))
    if cu:
        add(
            f"| catch-up of {cu['missed_gb']} GB (throttle {throttle_label(cu)}) | {cu['mb_per_sec']:.1f} MB/s,"
            f" {cu['ms'] / 1e3:.1f} s | fio {seq_mb or 0:.1f} MB/s | {ratio(cu['mb_per_sec'], seq_mb)}"
            f" | >= 0.5x |"
        )
        base = runs.get("cluster-catchup-baseline")
        during = [runs[n] for n in sorted(runs) if n.startswith("cluster-catchup-during-")]
        if base and during:
            p99s = [d["latency"]["p99_ms"] for d in during]
            b99 = base["latency"]["p99_ms"]
            add(
                f"| producer p99 during catch-up, {len(p99s)} pieces of 5 s (median / worst)"
                f" | {ms(median(p99s))} / {ms(max(p99s))} ms | without {ms(b99)} ms"
                f" | {ratio(median(p99s), b99)} / {ratio(max(p99s), b99)} | <= 2x |"
            )


def throttle_label(cu):
    """The catch-up run's --replication-throttle-bytes-per-sec as the report names it."""
    t = cu.get("throttle", "0")
    if t == "default":
        return "default"
    return "off" if t == "0" else f"{int(t) / 1e6:.0f} MB/s"


if __name__ == "__main__":
    main()
