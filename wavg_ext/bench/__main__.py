"""Benchmark of the fused wavg_ext ops against pure-PyTorch ways of doing the same update.

Run ``python -m wavg_ext.bench [--quick] [--suite all|ops|wrappers|twa|trust|dropin|threads] [--device cpu|cuda]
[--json PATH] [--plot PATH] [--repeats N] [--cases SUBSTR[,SUBSTR...]]``.

Suites: ``ops`` (the fused averaging ops, :mod:`wavg_ext.bench.ops`), ``wrappers`` (the
optimizer wrappers' per-step overhead, :mod:`wavg_ext.bench.wrappers`), ``twa``
(:mod:`wavg_ext.bench.twa`) and ``trust`` (what following the model, float64 and
compensated averages and ``skip_nonfinite`` cost, :mod:`wavg_ext.bench.trust`) and ``dropin``
(``wavg_ext.AveragedModel`` vs torch's, :mod:`wavg_ext.bench.dropin`).
``torchrun --nproc_per_node=2 -m wavg_ext.bench.distributed`` runs the distributed one.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Optional, Sequence

import torch

from .. import build_info
from . import dropin, ops, threads, trust, twa, wrappers
from .common import environment

def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="python -m wavg_ext.bench", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer repeats; skip loop and AveragedModel on gpt2")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if available and built, else cpu")
    p.add_argument("--json", metavar="PATH", help="write environment and all rows as JSON")
    p.add_argument("--plot", metavar="PATH", help="write a PNG bar chart (needs matplotlib)")
    p.add_argument("--repeats", type=int, metavar="N", help="timed calls per method (default 20, 5 with --quick; "
                                                             "fast calls get up to 25x more)")
    p.add_argument("--cases", metavar="SUBSTR", help="only cases whose id (op-shapes-dtype, or "
                   "step-method-shapes-dtype) contains one of these comma-separated substrings")
    p.add_argument("--suite", choices=["all", "ops", "wrappers", "twa", "trust", "dropin", "threads"],
                   default="all",
                   help="the fused averaging ops, the optimizer wrappers' per-step overhead, the TWA "
                        "kernels (projection, orthonormalization), the cost of the trust features (model "
                        "check, float64/compensated averages, skip_nonfinite), AveragedModel vs torch's (dropin), "
                        "one vs two threads around the kernels' threshold (threads), or all of them (default)")
    args = p.parse_args(argv)

    cuda_ok = torch.cuda.is_available() and build_info()["cuda"]
    device = torch.device(args.device or ("cuda" if cuda_ok else "cpu"))
    if device.type == "cuda" and not cuda_ok:
        p.error("--device cuda: no CUDA device, or wavg_ext was built without CUDA kernels")
    if args.plot:  # fail before the run, not after it
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            p.error("--plot needs matplotlib: pip install matplotlib")
    repeats = args.repeats or (5 if args.quick else 20)
    min_time = 0.05 if args.quick else 0.25

    cases = ops.all_cases() if args.suite in ("all", "ops") else []
    wcases = wrappers.all_cases(args.quick) if args.suite in ("all", "wrappers") else []
    tcases = twa.all_cases(args.quick, device) if args.suite in ("all", "twa") else []
    rcases = trust.all_cases(args.quick) if args.suite in ("all", "trust") else []
    dcases = dropin.all_cases(args.quick) if args.suite in ("all", "dropin") else []
    hcases = threads.all_cases(args.quick) if args.suite in ("all", "threads") and device.type == "cpu" else []
    if args.cases:
        subs = args.cases.split(",")
        cases = [c for c in cases if any(s in c.id for s in subs)]
        wcases = [c for c in wcases if any(s in c.id for s in subs)]
        tcases = [c for c in tcases if any(s in c.id for s in subs)]
        rcases = [c for c in rcases if any(s in c.id for s in subs)]
        dcases = [c for c in dcases if any(s in c.id for s in subs)]
        hcases = [c for c in hcases if any(s in c.id for s in subs)]
        if not cases and not wcases and not tcases and not rcases and not dcases and not hcases:
            names = [c.id for c in ops.all_cases()] + [c.id for c in wrappers.all_cases()] + \
                    [c.id for c in twa.all_cases()] + [c.id for c in trust.all_cases()] + \
                    [c.id for c in dropin.all_cases()] + [c.id for c in threads.all_cases()]
            p.error(f"--cases {args.cases!r} matches none of: {', '.join(names)}")

    env = environment(device)
    info = ", ".join(f"{k}={v}" for k, v in env["build_info"].items())
    print(f"wavg_ext.bench {env['date']} | {env['device_name']} ({device}) | torch {env['torch_version']} "
          f"| {env['num_threads']} threads\nbuild_info: {info}")
    print(f"median of >= {repeats} calls after 2 warm-up calls; GB/s = minimum bytes moved / median time "
          "for every method;\nceilings: flat fp32 buffers moving the same bytes. AveragedModel keeps "
          "its averages in the model's dtype (bf16 for bf16 params);\nsuch a baseline does not count as "
          "'fastest baseline'. % ceil: in-place ops vs ceiling_axpy (in-place triad), scale_copy_ vs\n"
          "ceiling_copy; the out-of-place triad pays write-allocate reads on CPU and is shown for reference.",
          flush=True)
    if env["loadavg"][0] > 0.5 * env["num_threads"]:
        print(f"WARNING: load average {env['loadavg'][0]:.2f} with {env['num_threads']} threads: other processes "
              "compete for the cores and the timings will be noisy.", flush=True)
    print(flush=True)
    t_start = time.perf_counter()
    results = []
    for case in cases:
        rows = ops.run_case(case, device, repeats, min_time, args.quick)
        results.append((case, rows))
        print(ops.format_case(case, rows) + "\n", flush=True)
    if results:
        print(ops.format_summary(results))
    wrows = []
    if wcases:
        rounds = args.repeats or (10 if args.quick else 30)
        print(f"\nOptimizer wrappers: per-step time with and without averaging, median of {rounds} interleaved "
              "rounds;\noverhead = step - sgd step; x floor = overhead / (bytes the averaging moves at the "
              "in-place triad bandwidth).", flush=True)
        for wcase in wcases:
            rows = wrappers.run_case(wcase, device, rounds, args.quick)
            wrows += rows
            print("\n" + wrappers.format_case(wcase, rows), flush=True)
    trows = []
    if tcases:
        print("\nTWA kernels: projection vs the paper's way and the bandwidth ceilings (same bytes, same run);\n"
              "orthonormalization of n snapshots vs torch.linalg.qr. GB/s = bytes the method must move / median "
              "time.", flush=True)
        for tcase in tcases:
            rows = twa.run_case(tcase, device, repeats, min_time, args.quick)
            trows += rows
            print("\n" + twa.format_case(tcase, rows), flush=True)
    rrows = []
    if rcases:
        rounds = args.repeats or (10 if args.quick else 40)
        print("\nTrust features: the per-step model check, float64 and compensated averages, skip_nonfinite's "
              "check and gated update,\nnext to the plain fused EMA update on the same float32 parameters.",
              flush=True)
        for rcase in rcases:
            rows = trust.run_case(rcase, device, rounds, args.quick)
            rrows += rows
            print("\n" + trust.format_case(rcase, rows), flush=True)
    drows = []
    if dcases:
        rounds = args.repeats or (10 if args.quick else 30)
        print("\nDrop-ins: AveragedModel.update_parameters, wavg_ext's vs torch's, made from the same model; "
              "x floor = time / (the bytes\nthe update moves at the in-place triad bandwidth of this run).", flush=True)
        for dcase in dcases:
            rows = dropin.run_case(dcase, device, rounds)
            drows += rows
            print("\n" + dropin.format_case(dcase, rows), flush=True)
    hrows = []
    if hcases:
        rounds = args.repeats or (10 if args.quick else 30)
        print("\nThreads: the planned ema_ (float32, warm) on one and two threads, interleaved call by call; the "
              f"kernels use one thread below {2 * threads.MIN_ELEMENTS_PER_THREAD} elements.", flush=True)
        for hcase in hcases:
            hrows += threads.run_case(hcase, device, rounds)
        print(threads.format_rows(hrows), flush=True)
    elapsed = time.perf_counter() - t_start
    load = os.getloadavg()[0]
    print(f"\n{len(cases) + len(wcases) + len(tcases) + len(rcases) + len(dcases) + len(hcases)} cases in {elapsed:.1f} s; load average now "
          f"{load:.2f}")
    if load > 0.5 * env["num_threads"] + 1:  # this run itself adds about 1
        print("WARNING: other processes competed for the cores during the run; the timings are noisy.")

    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(env=env, args=vars(args), repeats=repeats, elapsed_s=elapsed,
                           rows=[r for _, rows in results for r in rows], wrapper_rows=wrows, twa_rows=trows,
                           trust_rows=rrows, dropin_rows=drows, threads_rows=hrows),
                      f, indent=1)
        print(f"wrote {args.json}")
    if args.plot and results:
        ops.plot(results, env, args.plot)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
