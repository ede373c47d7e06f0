"""dots(basis, xs, k): c_i = sum over tensors <basis_t[i], x_t>, i < k."""

import pytest
import torch

from wavg_ext import ops


def _upcast(ts):
    return [t.double() for t in ts]


@pytest.mark.parametrize("k", [1, 3, 5])
def test_matches_float64_oracle(h, hb, device, k):
    for bdt, xdt in hb.PAIRS:
        basis = hb.basis(hb.SHAPES, 5, bdt, device)
        xs = hb.tensors(hb.SHAPES, xdt, device)
        basis0, xs0 = h.clones(basis), h.clones(xs)
        got = ops.dots(basis, xs, k)
        assert got.shape == (k,) and got.device.type == device
        assert got.dtype == (torch.float64 if bdt == torch.float64 else torch.float32)
        h.assert_all_bits_equal(basis, basis0, "basis modified")
        h.assert_all_bits_equal(xs, xs0, "xs modified")
        oracle = ops.reference.dots(_upcast(basis), _upcast(xs), k)
        plain = ops.reference.dots(basis, xs, k)
        floor = None
        if got.dtype == torch.float64:  # summation error of a float64 dot: ~eps * sum |terms|
            absdots = ops.reference.dots([b.abs().double() for b in basis], [x.abs().double() for x in xs], k)
            floor = 16 * torch.finfo(torch.float64).eps * absdots.max().item()
        hb.assert_fused_error(f"dots {bdt}/{xdt}", [got], [oracle], [plain], got.dtype, floor)


def test_dense_definition(hb, device):
    """Against the definition with the rows flattened: P[:k] @ x."""
    basis = hb.basis([(7, 9), (300,)], 4, torch.float64, device)
    xs = hb.tensors([(7, 9), (300,)], torch.float64, device)
    expected = hb.rows(basis, 3) @ hb.flat(xs)
    torch.testing.assert_close(ops.dots(basis, xs, 3).cpu(), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layout", ["channels_last_x", "channels_last_basis", "strided_x", "transposed_x"])
def test_layouts(hb, device, layout):
    shape = (4, 6, 5, 3)
    x = hb.tensors([shape], torch.float32, device)[0]
    basis = [hb.basis([shape], 3, torch.float32, device)[0]]
    if layout == "channels_last_x":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "channels_last_basis":  # rows laid out like a channels_last parameter
        x = x.contiguous(memory_format=torch.channels_last)
        b = ops.new_basis([x], 3)[0]
        b.copy_(basis[0])
        basis = [b]
    elif layout == "strided_x":
        x = torch.randn(4, 6, 5, 6, device=device)[..., ::2]
    else:
        x = torch.randn(3, 5, 6, 4, device=device).permute(3, 2, 1, 0)
    expected = hb.rows(basis) @ hb.flat([x])
    torch.testing.assert_close(ops.dots(basis, [x], 3).double().cpu(), expected, rtol=1e-5, atol=1e-4)


def test_many_small_tensors(hb, device):
    gen = torch.Generator().manual_seed(3)
    shapes = [(int(n),) for n in torch.randint(0, 40, (3000,), generator=gen)]
    basis = hb.basis(shapes, 4, torch.float32, device)
    xs = hb.tensors(shapes, torch.float32, device)
    expected = hb.rows(basis) @ hb.flat(xs)
    torch.testing.assert_close(ops.dots(basis, xs, 4).double().cpu(), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("bdt,xdt", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                     (torch.bfloat16, torch.bfloat16)])
def test_deterministic_across_threads(hb, device, bdt, xdt):
    basis = hb.basis([(200003,), (5,), (65536 * 3 + 1,)], 6, bdt, device)
    xs = hb.tensors([(200003,), (5,), (65536 * 3 + 1,)], xdt, device)
    results = []
    for threads in (torch.get_num_threads(), 1, torch.get_num_threads()):
        torch.set_num_threads(threads)
        results.append(ops.dots(basis, xs, 6))
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])


@pytest.mark.parametrize("path", ["ops", "torch.ops", "reference"])
def test_empty_lists_give_zeros(path):
    if path == "torch.ops":
        got = torch.ops.wavg_ext.dots([], [], 3)
    else:
        previous = ops.force_reference(path == "reference")
        try:
            got = ops.dots([], [], 3)
        finally:
            ops.force_reference(previous)
    assert torch.equal(got, torch.zeros(3))


def test_zero_numel_tensors_only(hb, device):
    basis = hb.basis([(0,), (2, 0)], 3, torch.float32, device)
    xs = hb.tensors([(0,), (2, 0)], torch.float32, device)
    assert torch.equal(ops.dots(basis, xs, 2).cpu(), torch.zeros(2))


@pytest.mark.parametrize("basis_dtype", [torch.float32, torch.bfloat16])
def test_float32_accuracy_on_a_long_dot(hb, basis_dtype):
    """float64 accumulation (float32 and bfloat16 bases): a 4M-element dot of positive
    terms is far more accurate than one float32 accumulator (the error would be ~1e-4
    relative)."""
    x = torch.rand(4_000_000, generator=torch.Generator().manual_seed(0))
    row = x.to(basis_dtype)
    basis = [row.unsqueeze(0).clone()]
    exact = (row.double() * x.double()).sum()
    got = ops.dots(basis, [x], 1)[0].double()
    assert abs(got - exact) / exact < 1e-6
