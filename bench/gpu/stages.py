#!/usr/bin/env python3
"""Helpers of bench/gpu/run-on-device.sh for the vram, threads, interactive64 and two-gpu stages.

  stages.py best-ub RESULTS PREFIX UBS         the smallest micro-batch whose single-stream decode
                                               and TTFT p50 stay within 5 % / 25 % of 512's (PREFIX:
                                               e.g. cpu-moe-16384, files PREFIX-ours-ubN.json)
  stages.py best-threads RESULTS PREFIX COUNTS the thread count with the fastest single-stream decode
  stages.py vram-table RESULTS                 markdown: every run of vram.tsv with decode, TTFT
                                               and llama.cpp's buffer sizes
  stages.py background-check JSON WANT LABEL   one line: were WANT background streams streaming
                                               when the measurement started, and the TTFT ratios
  stages.py runs JSON...                       one line per report: single-stream decode and TTFT
"""
import json
import os
import re
import sys


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def level(report, conc=1, key="levels"):
    for lv in (report or {}).get(key) or []:
        if lv.get("concurrency") == conc:
            return lv
    return {}


def fmt(v, digits=1):
    return "–" if v is None else f"{v:.{digits}f}"


def best_ub(results, prefix, ubs):
    ubs = sorted(int(u) for u in ubs.split())
    ref = level(load(os.path.join(results, f"{prefix}-ours-ub512.json")))
    ref_dec, ref_ttft = ref.get("decode_tok_s_per_stream_mean"), ref.get("ttft_ms_p50")
    for ub in ubs:
        lv = level(load(os.path.join(results, f"{prefix}-ours-ub{ub}.json")))
        dec, ttft = lv.get("decode_tok_s_per_stream_mean"), lv.get("ttft_ms_p50")
        if None in (dec, ttft, ref_dec, ref_ttft) or lv.get("errors"):
            continue
        if dec >= 0.95 * ref_dec and ttft <= 1.25 * ref_ttft:
            return ub
    return 512


def best_threads(results, prefix, counts):
    best, best_dec = None, -1.0
    for n in counts.split():
        lv = level(load(os.path.join(results, f"{prefix}-ours-t{n}.json")))
        dec = lv.get("decode_tok_s_per_stream_mean")
        if dec is not None and dec > best_dec:
            best, best_dec = n, dec
    return best or counts.split()[-1]


def buffers(path):
    """MiB per kind on the accelerator (CUDA*) and the host, from llama.cpp's log lines."""
    out = {}
    try:
        text = open(path).read()
    except OSError:
        return out
    for m in re.finditer(r"(\S+)\s+(KV|compute|output|model) buffer size =\s+([\d.]+) MiB", text):
        dev, kind, mib = m.group(1), m.group(2), float(m.group(3))
        # CUDA0, CUDA1: device memory; CUDA_Host: pinned host memory; CPU*: host memory.
        where = "gpu" if re.fullmatch(r"CUDA\d+", dev) else "host"
        out[(where, kind)] = out.get((where, kind), 0.0) + mib
    cells = re.findall(r"creating\s+(\S+) KV cache, size = (\d+) cells", text)
    if cells:
        out["cells"] = ", ".join(f"{k} {n}" for k, n in cells)
    return out


def vram_table(results):
    rows = []
    try:
        lines = open(os.path.join(results, "vram.tsv")).read().splitlines()[1:]
    except OSError:
        return "(no vram.tsv)"
    out = [
        "| profile | ctx/seqs | server | VRAM peak MiB | baseline | single-stream decode tok/s | TTFT p50 ms | TTFT p99 ms | errors | GPU KV MiB | GPU compute MiB | GPU output MiB | KV cells |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for line in lines:
        f = line.split("\t")
        if len(f) < 6:
            continue
        profile, ctx, par, name, base, peak = f[:6]
        tag = f"{profile.replace(':', '-')}-{ctx}-{name}"
        lv = level(load(os.path.join(results, f"{tag}.json")))
        b = buffers(os.path.join(results, f"{tag}-buffers.txt"))
        out.append(
            f"| {profile} | {ctx}/{par} | {name} | {peak} | {base} | {fmt(lv.get('decode_tok_s_per_stream_mean'))} | "
            f"{fmt(lv.get('ttft_ms_p50'))} | {fmt(lv.get('ttft_ms_p99'))} | {lv.get('errors', '–')} | "
            f"{fmt(b.get(('gpu', 'KV')))} | {fmt(b.get(('gpu', 'compute')))} | {fmt(b.get(('gpu', 'output')))} | "
            f"{b.get('cells', '–')} |"
        )
        rows.append(name)
    return "\n".join(out)


def background_check(path, want, label):
    r = load(path)
    if r is None:
        return f"{label}: no report ({path})"
    bg = r.get("background") or {}
    s = bg.get("streaming_at_start", 0)
    idle, busy = level(r), level(r, key="under_background")
    ok = "OK" if s >= int(want) else "NOT ALL STREAMING: the 'under batch' numbers are not what they claim"

    def ratio(a, b):
        return "–" if a is None or not b else f"{a / b:.2f}"

    return (
        f"{label}: background streaming at start {s}/{want} {ok}; background completed {bg.get('completed')}, "
        f"errors {bg.get('errors')}; INTERACTIVE TTFT p50 idle {fmt(idle.get('ttft_ms_p50'))} ms, under batch "
        f"{fmt(busy.get('ttft_ms_p50'))} ms ({ratio(busy.get('ttft_ms_p50'), idle.get('ttft_ms_p50'))}x); p99 "
        f"{fmt(idle.get('ttft_ms_p99'))} / {fmt(busy.get('ttft_ms_p99'))} ms "
        f"({ratio(busy.get('ttft_ms_p99'), idle.get('ttft_ms_p99'))}x); measured ok {busy.get('ok')}/{busy.get('requests')}, "
        f"batch streams running (mean) {fmt(busy.get('background_streaming_mean'))}"
    )


def main(argv):
    cmd = argv[1] if len(argv) > 1 else ""
    if cmd == "best-ub" and len(argv) == 5:
        print(best_ub(argv[2], argv[3], argv[4]))
    elif cmd == "best-threads" and len(argv) == 5:
        print(best_threads(argv[2], argv[3], argv[4]))
    elif cmd == "vram-table" and len(argv) == 3:
        print(vram_table(argv[2]))
    elif cmd == "runs":
        for path in argv[2:]:
            r = load(path)
            if r is None:
                continue
            lv = (r.get("levels") or [{}])[0]
            print(
                f"- {r.get('label')}: decode {fmt(lv.get('decode_tok_s_per_stream_mean'))} tok/s, "
                f"TTFT p50 {fmt(lv.get('ttft_ms_p50'))} ms, errors {lv.get('errors')}"
            )
    elif cmd == "background-check" and len(argv) == 5:
        print(background_check(argv[2], argv[3], argv[4]))
    else:
        print(__doc__, file=sys.stderr)
        return 64
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
