"""A small, complete tour of the CUDA kernels for memory and race checkers: every op on
mixed dtype pairs, odd sizes, zero-numel tensors, misaligned and strided views, more
tensors than one launch holds, a device tensor scalar, and the row kernels with more
rows than one pass (k > 8); each result checked against the float64 reference.

    python scripts/device_cases.py --device cuda     # under compute-sanitizer on a GPU
    python scripts/device_cases.py --emulate         # the emulated kernels (CPU tensors)

Exits 1 on a wrong result; a checker reports its own findings. Small on purpose: it
runs in seconds natively and in about a minute under compute-sanitizer.
"""

from __future__ import annotations

import argparse
import contextlib
import sys

import torch

from wavg_ext import ops

F32, F16, BF16, F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64
PAIRS = [(F32, F32), (F16, F16), (BF16, BF16), (F64, F64), (F32, F16), (F32, BF16), (F64, F32)]
SHAPES = [(0,), (1,), (7, 3), (4099,), (0, 5), (65536 + 13,), (33, 31)]


def rand(shape, dtype, device, gen):
    return torch.randn(shape, generator=gen, dtype=F64).to(dtype).to(device)


def check(name, got, want, tol):
    for i, (g, w) in enumerate(zip(got, want)):
        err = (g.double().cpu() - w.double().cpu()).abs().max().item() if g.numel() else 0.0
        if not err <= tol:
            print(f"FAIL {name}[{i}]: max error {err:.3g} > {tol:.3g}")
            return False
    return True


def pair_cases(device, gen):
    ok = True
    for op, scalar in (("running_mean_", 3.0), ("ema_", 0.25), ("accumulate_", -0.5), ("scale_copy_", 1.5)):
        shapes = SHAPES * 2
        pairs = [PAIRS[i % len(PAIRS)] for i in range(len(shapes))]
        outs = [rand(s, o, device, gen) for s, (o, _) in zip(shapes, pairs)]
        ins = [rand(s, x, device, gen) for s, (_, x) in zip(shapes, pairs)]
        # misaligned views (x[1:]) and a transposed pair: the scalar path and a temporary
        base_o, base_i = rand((4100,), F32, device, gen), rand((4102,), F32, device, gen)
        outs += [base_o[1:], rand((31, 33), F32, device, gen).t()]
        ins += [base_i[3:], rand((33, 31), F32, device, gen)]
        want = [o.double().clone() for o in outs]
        getattr(ops.reference, op)(want, [x.double() for x in ins], scalar)
        dev_scalar = torch.tensor(scalar, dtype=F64, device=device)
        getattr(ops, op)(outs, ins, dev_scalar)  # a device scalar, read by the kernel
        ok &= check(op, outs, want, 2e-2)
    return ok


def many_tensors(device, gen):
    n = 700  # more than one launch's 320 tensors
    outs = [rand((int(k),), F32, device, gen) for k in torch.randint(0, 50, (n,), generator=gen)]
    ins = [rand(o.shape, BF16, device, gen) for o in outs]
    want = [o.double().clone() for o in outs]
    ops.reference.ema_(want, [x.double() for x in ins], 0.1)
    ops.ema_(outs, ins, 0.1)
    return check("ema_ x700", outs, want, 1e-6)


def compensated_cases(device, gen):
    xs = [rand(s, BF16, device, gen) for s in SHAPES]
    avgs = [rand(s, BF16, device, gen) for s in SHAPES]
    comps = [torch.zeros_like(a) for a in avgs]
    want = [a.double() for a in avgs]
    ops.reference.ema_(want, [x.double() for x in xs], 0.3)
    ops.ema_compensated_(avgs, comps, xs, 0.3)
    ok = check("ema_compensated_", [a.double() + c.double() for a, c in zip(avgs, comps)], want, 1e-4)
    ops.running_mean_compensated_(avgs, comps, xs, 0.0)
    flag_clean = ops.nonfinite_flag(xs).item()
    xs[3][17] = float("inf")
    flag_bad = ops.nonfinite_flag(xs).item()
    if (flag_clean, flag_bad) != (0, 1):
        print(f"FAIL nonfinite_flag: {flag_clean}, {flag_bad}")
        ok = False
    return ok


def multi_list_cases(device, gen):
    """ema_many_ with more profiles than one pass (4) on mixed pairs, misaligned views and more
    tensors than one launch of depth 5 holds; window_push_ on a ring of two slots."""
    n = 400
    shapes = [(int(k),) for k in torch.randint(0, 300, (n,), generator=gen)] + SHAPES
    pairs = [[(F32, F32), (F32, BF16), (F64, F32), (BF16, BF16)][i % 4] for i in range(len(shapes))]
    xs = [rand(s, x, device, gen) for s, (_, x) in zip(shapes, pairs)]
    base = rand((5000,), F32, device, gen)
    xs.append(base[1:4097])  # misaligned
    pairs.append((F32, F32))
    weights = [0.5, 0.1, 0.01, 0.9, 0.25, 0.3]
    avgs = [[rand(x.shape, o, device, gen) for x, (o, _) in zip(xs, pairs)] for _ in weights]
    want = [[a.double().clone() for a in profile] for profile in avgs]
    for w, profile in zip(weights, want):
        ops.reference.ema_(profile, [x.double() for x in xs], w)
    ops.ema_many_(avgs, xs, weights)
    ok = all(check(f"ema_many_ profile {p}", avgs[p], want[p], 2e-2) for p in range(len(weights)))
    sums = [torch.zeros(x.shape, dtype=F64, device=device) for x in xs]
    ring = [[torch.zeros_like(x) for x in xs] for _ in range(2)]
    history = []
    for step in range(5):
        new = [rand(x.shape, x.dtype, device, gen) for x in xs]
        history.append(new)
        ops.window_push_(sums, ring[step % 2], new)
    want = [h1.double() + h2.double() for h1, h2 in zip(*history[-2:])]
    ok &= check("window_push_", sums, want, 1e-9)
    return ok


def row_cases(device, gen):
    shapes = [(3,), (17, 241), (0,), (65536 * 2 + 5,)]
    k = 10  # more than one pass of 8 rows
    basis = ops.new_basis([torch.empty(s, device=device) for s in shapes], k + 1)
    for j in range(k):
        for b, s in zip(basis, shapes):
            b[j].copy_(rand(s, F32, device, gen))
    xs = [rand(s, F32, device, gen) for s in shapes]
    rows = torch.cat([b[:k].reshape(k, -1).double().cpu() for b in basis], dim=1)
    flat = torch.cat([x.reshape(-1).double().cpu() for x in xs])
    ok = check("dots", [ops.dots(basis, xs, k)], [rows @ flat], 1e-3)
    coeffs = torch.randn(k, generator=gen, dtype=F64)
    outs = [x.clone() for x in xs]
    ops.combine_(outs, basis, coeffs.to(device), 0.5, 2.0)
    want = 2.0 * flat + 0.5 * (coeffs @ rows)
    got = torch.cat([o.reshape(-1).double().cpu() for o in outs])
    ok &= check("combine_", [got], [want], 1e-3)
    norm = ops.orthonormalize_(basis, k, 2)
    ok &= bool(torch.isfinite(norm).item())
    grads = [x.clone() for x in xs]
    ops.project_(grads, basis, k + 1)
    return ok


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--emulate", action="store_true", help="CPU tensors through the emulated CUDA kernels")
    args = p.parse_args(argv)
    device = "cpu" if args.emulate else args.device
    if args.emulate:
        from wavg_ext.testing import cuda_emulation
        context = cuda_emulation()
    else:
        context = contextlib.nullcontext()
    gen = torch.Generator().manual_seed(0)
    with context:
        results = {f.__name__: f(device, gen)
                   for f in (pair_cases, many_tensors, compensated_cases, multi_list_cases, row_cases)}
    if device != "cpu":
        torch.cuda.synchronize()
    for name, ok in results.items():
        print(f"{name}: {'ok' if ok else 'FAILED'}")
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
