#!/usr/bin/env python3
"""Rows of the GPU memory table: what each worker's advert says against nvidia-smi.

  memory.py header
  memory.py row LABEL SMI.txt < ADVERTS.jsonl
      ADVERTS.jsonl: `moectl workers --json` (one advert per line);
      SMI.txt: `nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits`
Each advert's first accelerator gives weights (measured, and as planned), KV, compute buffers,
their sum, the driver's per-process figure the worker read through NVML and the overhead it
derived; nvidia-smi's figure is matched by the process id in NVML's report, or, with one
worker and one process, taken as is. Sizes in MiB.
"""
import json
import sys

MIB = 1 << 20


def mib(b):
    return "-" if b is None else f"{b / MIB:.0f}"


def header():
    print("| run | worker | profile | n_cpu_moe | GPU weights planned | GPU weights measured | KV | compute | advert sum | NVML process | overhead | nvidia-smi process | advert sum / smi | (sum + overhead) / smi | host experts | pinned |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")


def row(label, smi_path):
    adverts = [json.loads(line) for line in sys.stdin if line.strip()]
    smi = []
    for line in open(smi_path):
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[1].isdigit():
            smi.append((int(parts[0]), int(parts[1]) * MIB))
    smi_used = [b for _, b in smi]
    for a in sorted(adverts, key=lambda a: a["id"]):
        gpus = [d for d in a.get("devices", []) if d.get("kind") != "cpu"]
        if not gpus:
            continue
        d = gpus[0]
        total = d.get("weight_bytes", 0) + d.get("kv_bytes", 0) + d.get("compute_bytes", 0)
        process = d.get("process_bytes")
        # NVML's per-process number is nvidia-smi's; pick the nvidia-smi row with the same size,
        # else the only one.
        seen = None
        if process is not None:
            close = [b for b in smi_used if abs(b - process) <= 64 * MIB]
            seen = close[0] if close else None
        if seen is None and len(smi_used) == 1 and len(adverts) == 1:
            seen = smi_used[0]
        mem = a.get("memory", {})
        overhead = d.get("overhead_bytes", 0)
        r1 = "-" if not seen else f"{total / seen:.3f}"
        r2 = "-" if not seen else f"{(total + overhead) / seen:.3f}"
        print(
            f"| {label} | {a['id']} | {a['offload']['profile']} | {a['offload']['n_cpu_moe']} | "
            f"{mib(d.get('planned_weight_bytes'))} | {mib(d.get('weight_bytes'))} | {mib(d.get('kv_bytes'))} | "
            f"{mib(d.get('compute_bytes'))} | {mib(total)} | {mib(process)} | {mib(d.get('overhead_bytes'))} | "
            f"{mib(seen)} | {r1} | {r2} | "
            f"{mib(mem.get('host_expert_bytes'))} | {mem.get('host_experts_pinned')} |"
        )


if __name__ == "__main__":
    if sys.argv[1:2] == ["header"]:
        header()
    elif sys.argv[1:2] == ["row"] and len(sys.argv) >= 4:
        row(sys.argv[2], sys.argv[3])
    else:
        sys.exit(__doc__)
