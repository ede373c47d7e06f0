"""window_push_: one step of a sliding-window sum (sum <- sum + (x - slot), slot <- x). Every
backend (the CPU kernels of every ISA, the emulated CUDA kernels, CUDA) gives the
reference's bits, within twice plain PyTorch's error against float64; a ring of k slots
keeps the sum of the last k samples over many steps; bad calls are refused before
anything changes. Public API."""

import pytest
import torch

from wavg_ext import ops
from wavg_ext.ops import reference

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
SHAPES = [(1,), (31,), (7, 33), (0,), (65536 + 77,), (3, 0), (129, 257)]
PAIRS = [(F32, F32), (F64, F64), (F16, F16), (BF16, BF16), (F16, F32), (BF16, F32), (F32, F64), (BF16, F64)]


def _lists(device, x_dtype, sum_dtype, shapes=SHAPES, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(s, generator=g).to(x_dtype).to(device) for s in shapes]
    sums = [(4 * torch.randn(s, generator=g)).to(sum_dtype).to(device) for s in shapes]
    slots = [torch.randn(s, generator=g).to(x_dtype).to(device) for s in shapes]
    return sums, slots, xs


def _bits(t):
    return t.contiguous().reshape(-1).view(torch.uint8)


def _same(a, b):
    return len(a) == len(b) and all(x.dtype == y.dtype and torch.equal(_bits(x), _bits(y)) for x, y in zip(a, b))


@pytest.mark.parametrize("x_dtype, sum_dtype", PAIRS, ids=[f"{str(x)[6:]}-{str(s)[6:]}" for x, s in PAIRS])
def test_bits_equal_the_reference_and_error_is_bounded(device, x_dtype, sum_dtype):
    sums, slots, xs = _lists(device, x_dtype, sum_dtype)
    start = [s.clone() for s in sums], [o.clone() for o in slots]
    want = [s.clone() for s in sums], [o.clone() for o in slots]
    reference.window_push_(*want, xs)
    ops.window_push_(sums, slots, xs)
    assert _same(sums, want[0]) and _same(slots, want[1])
    assert _same(slots, xs)  # each slot holds its sample's bits
    for s, s0, o0, x in zip(sums, *start, xs):
        if s.numel() == 0:
            continue
        exact = s0.double() + (x.double() - o0.double())
        plain = s0 + (x.to(s0.dtype) - o0.to(s0.dtype))
        err = (s.double() - exact).abs().max().item()
        plain_err = (plain.double() - exact).abs().max().item()
        ulp = torch.finfo(sum_dtype).eps * max(exact.abs().max().item(), 1.0)
        assert err <= 2 * plain_err + ulp, (err, plain_err)


@pytest.mark.parametrize("k", [1, 3, 8])
def test_a_ring_of_k_slots_keeps_the_sum_of_the_last_k_samples(device, k):
    g = torch.Generator().manual_seed(k)
    shapes = [(100,), (7, 9)]
    sums = [torch.zeros(s, dtype=F64, device=device) for s in shapes]
    ring = [[torch.zeros(s, device=device) for s in shapes] for _ in range(k)]
    history = []
    for step in range(3 * k + 2):
        xs = [torch.randn(s, generator=g).to(device) for s in shapes]
        history.append([x.clone() for x in xs])
        ops.window_push_(sums, ring[step % k], xs)
        window = history[-k:]
        for i in range(len(shapes)):
            exact = sum(h[i].double() for h in window)
            torch.testing.assert_close(sums[i], exact, rtol=0, atol=1e-12)


def test_layouts_that_need_a_temporary_x():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(40, 30, generator=g)
    xs = [base.t(), torch.randn(50, generator=g)[::2]]
    sums = [torch.zeros(30, 40, dtype=F64), torch.zeros(25, dtype=F64)]
    slots = [torch.zeros(30, 40), torch.zeros(25)]
    ops.window_push_(sums, slots, xs)
    assert torch.equal(slots[0], xs[0]) and torch.equal(slots[1], xs[1])
    assert torch.equal(sums[0], xs[0].double()) and torch.equal(sums[1], xs[1].double())


def test_opcheck():
    sums, slots, xs = _lists("cpu", F32, F64, shapes=[(7,), (3, 5)])
    torch.library.opcheck(torch.ops.wavg_ext.window_push_.default, (sums, slots, xs))


BAD = {
    "slot dtype": (lambda s, o, x: (s, [o[0].double()] + o[1:], x), r"slots\[0\] is Double but xs\[0\] is Float"),
    "slot shape": (lambda s, o, x: (s, [torch.zeros(4)] + o[1:], x), r"slots\[0\] has shape \[4\] but sums\[0\]"),
    "slot strides": (lambda s, o, x: (s, o[:1] + [torch.zeros(5, 3).t()], x), r"sums\[1\] and slots\[1\] must be dense"),
    "slot count": (lambda s, o, x: (s, o[:1], x), "slots has 1 tensors but sums has 2"),
    "sum dtype": (lambda s, o, x: ([s[0].half()] + s[1:], o, x), r"sums\[0\] is Half but xs\[0\] is Float"),
    "slot is x": (lambda s, o, x: (s, [x[0]] + o[1:], x), r"shares memory with slots\[0\]|slots\[0\].*share"),
    "slot is sum": (lambda s, o, x: (s, [s[0].float()] + o[1:], [x[0].double(), x[1]]), r"slots\[0\] is Float"),
    "shape": (lambda s, o, x: (s, o, [x[0], torch.zeros(4)]), r"sums\[1\] has shape \[3, 5\] but xs\[1\]"),
}


@pytest.mark.parametrize("case", list(BAD))
@pytest.mark.parametrize("path", ["kernels", "reference"])
def test_bad_calls_are_refused_before_anything_changes(case, path):
    sums, slots, xs = _lists("cpu", F32, F64, shapes=[(3,), (3, 5)])
    make, message = BAD[case]
    args = make(sums, slots, xs)
    tensors = [t for lst in args for t in lst]
    before = [t.clone() for t in tensors]
    previous = ops.force_reference(path == "reference")
    try:
        with pytest.raises((TypeError, ValueError), match=message) as raised:
            ops.window_push_(*args)
        with pytest.raises(raised.type, match=message):
            ops.validate("window_push_", *args)
    finally:
        ops.force_reference(previous)
    assert _same(tensors, before)
