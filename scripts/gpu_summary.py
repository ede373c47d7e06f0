"""The summary table of scripts/gpu_check.sh: its stages' results (stages.txt) and the
GPU benchmark (bench_ops.json, bench_project.json, bench_dropin.json, written by python -m wavg_ext.bench)
as Markdown, ready for benchmarks/RESULTS.md.

    python scripts/gpu_summary.py OUTPUT_DIR
"""

from __future__ import annotations

import json
import os
import sys
from typing import List, Optional


def _load(folder: str, name: str) -> Optional[dict]:
    path = os.path.join(folder, name)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _ms(row: Optional[dict]) -> str:
    return f"{row['median_ms']:.3f}" if row else "-"


def summary(folder: str) -> str:
    ops, proj = _load(folder, "bench_ops.json"), _load(folder, "bench_project.json")
    dropin = _load(folder, "bench_dropin.json")
    env = (ops or proj or dropin or {}).get("env", {})
    lines: List[str] = [f"## GPU check: {env.get('device_name', '?')}, torch {env.get('torch_version', '?')}, "
                        f"{env.get('date', '?')}", "", "| stage | result | seconds |", "| --- | --- | ---: |"]
    status = os.path.join(folder, "stages.txt")
    if os.path.exists(status):
        with open(status) as f:
            for line in f:
                parts = line.split()  # name, verdict words..., "<n>s", log path
                if len(parts) >= 4:
                    lines.append(f"| {parts[0]} | {' '.join(parts[1:-2])} | {parts[-2].rstrip('s')} |")
    if ops:
        lines += ["", "| case | floor ms (bytes / copy GB/s) | fused ms | fused GB/s | _foreach_lerp_ ms | "
                      "AveragedModel ms | fused vs fastest baseline |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        by_case: dict = {}
        for r in ops["rows"]:
            by_case.setdefault(r["case"], {})[r["method"]] = r
        for case, m in by_case.items():
            fused, copy = m["fused"], m.get("ceiling_copy")
            floor = f"{fused['bytes'] / copy['gbps'] / 1e6:.3f}" if copy else "-"
            lines.append(f"| {case} | {floor} | {_ms(fused)} | {fused['gbps']:.0f} | {_ms(m.get('foreach_lerp'))} | "
                         f"{_ms(m.get('averaged_model'))} | {fused.get('fused_speedup', float('nan')):.2f}x |")
        copies = [m["ceiling_copy"]["gbps"] for m in by_case.values() if "ceiling_copy" in m]
        if copies:
            lines += ["", f"copy ceiling (bytes read + written), measured in this run: {min(copies):.0f} to "
                          f"{max(copies):.0f} GB/s"]
    if proj:
        lines += ["", "| project_ case | method | ms | GB/s |", "| --- | --- | ---: | ---: |"]
        for r in proj["twa_rows"]:
            lines.append(f"| {r['case']} | {r['method']} | {r['median_ms']:.3f} | {r['gbps']:.0f} |")
    if dropin:
        lines += ["", "| drop-in case | method | ms | x floor | speedup vs torch (AveragedModel) or timm (ModelEMA) |",
                  "| --- | --- | ---: | ---: | ---: |"]
        for r in dropin["dropin_rows"]:
            lines.append(f"| {r['case']} | {r['method']} | {r['ms']:.3f} | {r['x_floor']:.2f}x | "
                         f"{r['speedup_vs_torch']:.2f}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    print(summary(sys.argv[1]))
