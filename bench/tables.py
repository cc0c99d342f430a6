#!/usr/bin/env python3
"""Turns moe-bench JSON reports into the markdown tables of docs/benchmarks/.

  tables.py side-by-side OURS.json[,OURS2.json…] UPSTREAM.json[,UPSTREAM2.json…]
      one table, ratio ours/llama-server per row; with several rounds (comma-separated, paired in
      order) the values are medians over rounds and the last column lists each round's ratio
  tables.py gateway DIRECT.json [DIRECT.json ...] -- GATEWAY.json [GATEWAY.json ...]
  tables.py background REPORT.json
      a run with --background-batch: each level's TTFT idle vs under the BATCH streams
"""
import json
import statistics
import sys


def load(path):
    with open(path) as f:
        return json.load(f)


def fmt(v, digits=1):
    return "-" if v is None else f"{v:.{digits}f}"


def ratio(a, b):
    return "-" if a is None or b in (None, 0) else f"{a / b:.2f}"


def by_conc(report):
    return {level["concurrency"]: level for level in report["levels"]}


def median_level(reports, conc, key):
    vals = [r[conc].get(key) for r in reports if conc in r and r[conc].get(key) is not None]
    return statistics.median(vals) if vals else None


def side_by_side(ours_paths, theirs_paths):
    ours = [by_conc(load(p)) for p in ours_paths.split(",")]
    theirs = [by_conc(load(p)) for p in theirs_paths.split(",")]
    levels = sorted(set.intersection(*(set(r) for r in ours + theirs)))
    several = len(ours) > 1 and len(ours) == len(theirs)
    rows = []

    def row(name, key, conc, better, digits=1):
        a, b = median_level(ours, conc, key), median_level(theirs, conc, key)
        per_round = " / ".join(ratio(o[conc].get(key), t[conc].get(key)) for o, t in zip(ours, theirs))
        rows.append((f"{name} ({better})", fmt(a, digits), fmt(b, digits), ratio(a, b), per_round))

    plural = lambda c: f"{c} stream{'s' if c > 1 else ''}"
    if 1 in levels:
        row("single-stream decode tok/s", "decode_tok_s_per_stream_mean", 1, "higher is better")
    for c in levels:
        row(f"aggregate tok/s, {plural(c)}", "aggregate_tok_s", c, "higher is better")
    for c in levels:
        if c > 1:
            row(f"decode tok/s per stream, {plural(c)}", "decode_tok_s_per_stream_mean", c, "higher is better")
    for c in levels:
        row(f"TTFT p50 ms, {plural(c)}", "ttft_ms_p50", c, "lower is better")
        row(f"TTFT p99 ms, {plural(c)}", "ttft_ms_p99", c, "lower is better")
    head = "| metric | ours (moe-worker) | llama-server | ours / llama-server |"
    rule = "|---|---:|---:|---:|"
    if several:
        head += " ratio in each round |"
        rule += "---:|"
    out = [head, rule]
    for n, a, b, r, per in rows:
        out.append(f"| {n} | {a} | {b} | {r} |" + (f" {per} |" if several else ""))
    notes = []
    for name, reps in (("ours", ours), ("llama-server", theirs)):
        for i, rep in enumerate(reps, 1):
            for c in levels:
                lv = rep[c]
                if lv["errors"] or lv["skipped"]:
                    notes.append(f"{name} round {i} at {c}: {lv['errors']} errors {lv['error_kinds']}, {lv['skipped']} not sent")
    out.append("")
    if several:
        out.append(f"Values are medians over {len(ours)} rounds (ours, llama-server, ours, llama-server, …).")
    if levels:
        c0 = levels[0]
        out.append(
            "Prompt tokens per request (server-counted): "
            f"ours {fmt(median_level(ours, c0, 'prompt_tokens_mean'), 0)}, llama-server {fmt(median_level(theirs, c0, 'prompt_tokens_mean'), 0)}; "
            "generated tokens per request: "
            f"ours {fmt(median_level(ours, c0, 'completion_tokens_mean'), 0)}, llama-server {fmt(median_level(theirs, c0, 'completion_tokens_mean'), 0)}."
        )
    if notes:
        out.append("Errors: " + "; ".join(notes) + ".")
    return "\n".join(out)


def gateway(direct_paths, gateway_paths):
    direct = [by_conc(load(p)) for p in direct_paths]
    via = [by_conc(load(p)) for p in gateway_paths]
    levels = sorted(set.intersection(*(set(r) for r in direct + via)))
    out = [
        "| streams | TTFT p50 direct ms | TTFT p50 gateway ms | Δ p50 ms | TTFT p99 direct ms | TTFT p99 gateway ms | Δ p99 ms | tok/s direct | tok/s gateway | gateway / direct tok/s | direct run-to-run Δ p99 ms |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def med(reps, c, key):
        vals = [r[c][key] for r in reps if r[c].get(key) is not None]
        return statistics.median(vals) if vals else None

    for c in levels:
        d50, g50 = med(direct, c, "ttft_ms_p50"), med(via, c, "ttft_ms_p50")
        d99, g99 = med(direct, c, "ttft_ms_p99"), med(via, c, "ttft_ms_p99")
        dt, gt = med(direct, c, "aggregate_tok_s"), med(via, c, "aggregate_tok_s")
        spread = [r[c]["ttft_ms_p99"] for r in direct if r[c].get("ttft_ms_p99") is not None]
        noise = max(spread) - min(spread) if len(spread) > 1 else None
        delta = lambda a, b: None if a is None or b is None else b - a
        out.append(
            f"| {c} | {fmt(d50, 2)} | {fmt(g50, 2)} | {fmt(delta(d50, g50), 2)} | {fmt(d99, 2)} | {fmt(g99, 2)} | "
            f"{fmt(delta(d99, g99), 2)} | {fmt(dt)} | {fmt(gt)} | {ratio(gt, dt)} | {fmt(noise, 2)} |"
        )
    out.append("")
    out.append(f"Medians over {len(direct)} direct and {len(via)} gateway runs, interleaved (direct, gateway, direct, …).")
    return "\n".join(out)


def background(path):
    report = load(path)
    idle = by_conc(report)
    busy = {level["concurrency"]: level for level in report.get("under_background", [])}
    bg = report.get("background") or {}
    out = [
        "| interactive streams | TTFT p50 idle ms | TTFT p50 under batch ms | TTFT p99 idle ms | TTFT p99 under batch ms | p50 ratio | batch streams running (mean) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in sorted(set(idle) & set(busy)):
        i, b = idle[c], busy[c]
        out.append(
            f"| {c} | {fmt(i.get('ttft_ms_p50'))} | {fmt(b.get('ttft_ms_p50'))} | {fmt(i.get('ttft_ms_p99'))} | "
            f"{fmt(b.get('ttft_ms_p99'))} | {ratio(b.get('ttft_ms_p50'), i.get('ttft_ms_p50'))} | "
            f"{fmt(b.get('background_streaming_mean'))} |"
        )
    out.append("")
    out.append(f"Background: {json.dumps(bg)}")
    return "\n".join(out)


def main(argv):
    if len(argv) == 3 and argv[0] == "side-by-side":
        print(side_by_side(argv[1], argv[2]))
    elif len(argv) == 2 and argv[0] == "background":
        print(background(argv[1]))
    elif len(argv) >= 4 and argv[0] == "gateway" and "--" in argv:
        i = argv.index("--")
        print(gateway(argv[1:i], argv[i + 1:]))
    else:
        print(__doc__, file=sys.stderr)
        return 64
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
