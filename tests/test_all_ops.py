"""Scenarios every op must pass, whatever its formula: sizes, empty and zero-numel
tensors, many tensors, layouts with guard regions, determinism, scalar forms.
The formulas themselves are tested in each op's own file."""

import pytest
import torch

OP = "*"  # conftest.ALL_OPS: parametrize `op` over every op


def test_zero_numel_tensors(h, op, device, zero_numel):
    h.scenario_zero_numel(op, device, zero_numel)


@pytest.mark.parametrize("path", ["ops", "torch.ops", "reference"])
@pytest.mark.parametrize("kind", ["py", "tensor"])
def test_empty_lists_are_a_no_op(h, op, path, kind):
    h.scenario_empty_lists(op, path, kind)


def test_3000_small_tensors(h, op, device):
    h.scenario_many_small(op, device)


def test_tensor_larger_than_one_cuda_launch(h, op, device):
    h.scenario_big(op, device)


def test_layouts_and_guards(h, op, device, dtypes, layouts):
    h.scenario_layouts(op, device, dtypes, layouts)


def test_deterministic(h, op, device):
    h.scenario_determinism(op, device)


@pytest.mark.parametrize("tensor_dtype", [torch.float32, torch.float64, torch.int64, torch.int32])
def test_python_and_tensor_scalar_agree(h, op, device, tensor_dtype):
    h.scenario_scalar_forms(op, device, tensor_dtype)
