"""Trainable Weight Averaging (TWA, Li et al.) as a drop-in optimizer wrapper.

TWA searches for the best weighted average of the sampled weights ``w_1..w_n`` by
training inside their span: Gram-Schmidt turns the samples into an orthonormal basis
``P = [e_1..e_n]`` (eq. 3), the weights start at a point of the span (the samples' mean
in the head stage, the last sample in the tail stage) and every step projects the
gradient onto it (Algorithm 1). The paper's l2 penalty on the averaging coefficients
(eq. 5) becomes a decay of the weights (appendix B, eq. 8)::

    w <- (1 - lambda) * w - eta * P P^T g

:class:`TWA` keeps ``P`` as a basis of the fused ops (one ``[capacity, *p.shape]`` tensor
per parameter, :func:`wavg_ext.ops.new_basis`): ``collect()`` adds a sample with
``orthonormalize_`` (CGS2), a training step is one ``project_`` call over all tensors,
a ``_foreach_mul_`` and the base optimizer's step.
"""

from __future__ import annotations

import copy
import math
import os
import warnings
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.optim import Optimizer

from .. import ops
from ..distributed import ShardedVectors, basis_like_param, local_tensor, local_part
from ..merge import load_checkpoint
from ..ops.basis import default_rtol
from .wrapper import _check_int, _check_real, _check_saved_tensors, _WrappedOptimizer

__all__ = ["TWA", "RankDeficientSampleWarning", "NonFiniteSampleWarning"]

_STORAGE_DTYPES = (torch.float32, torch.bfloat16, torch.float64)
_INITS = ("mean", "current")
Checkpoint = Union[str, "os.PathLike[str]", Mapping[str, Any]]


class RankDeficientSampleWarning(UserWarning):
    """A TWA sample added no new direction to the basis (its weights already lie in the span of
    the earlier samples, up to ``rtol``) and was refused: the basis did not grow."""


class NonFiniteSampleWarning(UserWarning):
    """A TWA sample (``collect(skip_nonfinite=True)``) or checkpoint (``from_checkpoints(...,
    skip_nonfinite=True)``) held NaN/inf values and was skipped: nothing changed and it does
    not count towards the samples' mean."""


class _NonFiniteSample(ValueError):
    """A sample or checkpoint holds NaN/inf (caught where skipping was asked for)."""


def _nonfinite_kind(t: torch.Tensor) -> str:
    """'NaN', 'inf' or 'NaN and inf' for a tensor known to hold non-finite values (syncs)."""
    kinds = [word for word, test in (("NaN", torch.isnan), ("inf", torch.isinf)) if bool(test(t).any())]
    return " and ".join(kinds) or "NaN/inf"  # (a shard of a DTensor may hold none of them)


class TWA(_WrappedOptimizer):
    """Wraps ``optimizer`` for Trainable Weight Averaging: collect samples, then train in their span.

    Like the averaging wrappers it shares the base optimizer's ``param_groups``, ``state``
    and ``defaults`` (LR schedulers, ``GradScaler``, ``zero_grad`` work unchanged) and is a
    ``torch.optim.Optimizer``. The whole model is one vector: all parameters of the base
    optimizer's groups, in order (they must be on one device).

    Usage: train normally with ``step()`` and call ``collect()`` at each sampling point
    (e.g. every epoch end); then ``start_subspace(init)`` puts the weights into the span of
    the samples and from then on every ``step()``

    1. projects the gradient onto the span with one :func:`wavg_ext.ops.project_` call over
       all parameters (a parameter whose ``grad`` is None gets a zero gradient first: the
       projection of the whole-model gradient has components on every tensor);
    2. multiplies all parameters by ``1 - reg`` (eq. 8 of the paper);
    3. runs the base optimizer's step.

    With a closure (e.g. LBFGS), the gradients are projected each time the closure runs,
    and the decay is applied before the base step calls it.

    Reading of eq. (8), ``w <- (1 - lambda) w - eta P P^T g``: ``reg`` is lambda itself, a
    per-step decay that does not depend on the learning rate (eq. 8 has ``1 - lambda``, not
    ``1 - eta lambda``) and is applied directly to the weights, not fed through momentum.
    It is the gradient step of the penalty ``lambda/2 sum alpha_i^2`` on the averaging
    coefficients mapped to parameter space (eqs. 6-7). The base optimizer's own
    ``weight_decay`` still acts on top of it (on the projected gradient).

    The weights stay in the span when the base update is a linear function of the
    (projected) gradients and the weights: SGD with or without momentum/Nesterov and weight
    decay. An elementwise-adaptive optimizer (Adam, RMSprop) rescales each coordinate and
    moves the weights out of the span. ``start_subspace`` clears the base optimizer's state
    by default, because momentum collected before holds full-space gradients.

    Buffers (BatchNorm running statistics) are not part of the basis: recompute them with
    :func:`wavg_ext.update_bn` after ``start_subspace`` and after training.

    Args:
        optimizer: any ``torch.optim.Optimizer``.
        capacity: the most samples the basis can hold (>= 1); the basis takes
            ``capacity`` copies of the model in ``storage_dtype``.
        reg: lambda of eq. (8) in [0, 1); the paper uses 1e-5 (5e-5 in its tail-stage runs).
        storage_dtype: dtype of the basis: ``torch.float32``, ``torch.bfloat16`` or
            ``torch.float64`` (float64 parameters need float64). Default: float32, float64 for
            float64 parameters. With bfloat16 the samples are orthonormalized in float32 and
            only the unit basis vectors are rounded to bfloat16.
        rtol: a sample whose relative residual (its norm after removing the span of the
            earlier samples, over its own norm) is <= rtol adds no new direction and is
            refused. Default: :func:`wavg_ext.ops.basis.default_rtol` of the storage dtype
            (1e-5 for float32, 2e-2 for bfloat16, 1e-12 for float64).
    """

    method = "TWA"
    _state_key = "twa"

    def __init__(self, optimizer: Optimizer, capacity: int, reg: float = 1e-5,
                 storage_dtype: Optional[torch.dtype] = None, rtol: Optional[float] = None) -> None:
        super().__init__(optimizer)
        capacity = _check_int("capacity", capacity, 1)
        reg = _check_real("reg", reg)
        if not 0.0 <= reg < 1.0:
            raise ValueError(f"reg must be in [0, 1), got {reg}")
        if storage_dtype is not None and storage_dtype not in _STORAGE_DTYPES:
            raise TypeError(f"storage_dtype must be torch.float32, torch.bfloat16 or torch.float64, "
                            f"got {storage_dtype!r}")
        if rtol is not None:
            rtol = _check_real("rtol", rtol)
            if not 0.0 <= rtol < 1.0:
                raise ValueError(f"rtol must be in [0, 1), got {rtol}")
        self.capacity = capacity
        self.reg = reg
        self.storage_dtype = storage_dtype
        self._rtol = rtol
        self._scratch: Optional[List[torch.Tensor]] = None  # float32 sample for a bfloat16 basis
        self._build_basis()
        # Host-side state (no device sync per step).
        self._k = 0  # basis rows in use
        self._num_samples = 0  # samples collected, refused ones included (not NaN/inf ones)
        # Sum of the samples' coefficients P^T w_j (every sample lies in span(P)): the
        # samples' mean is P @ (sum / num_samples), with no model-sized buffer.
        self._coef_sum = torch.zeros(capacity, dtype=torch.float64)
        self._in_subspace = False

    # ----------------------------------------------------------------- tensors

    def _build_basis(self) -> None:
        """(Re)makes the basis for the base optimizer's parameters; assigns nothing unless all succeeds."""
        params = self._flat_params()
        if not params:
            raise ValueError("the base optimizer has no parameters")
        for i, p in enumerate(params):
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"param_groups tensor {i} is a {type(p).__name__}, not a Tensor")
            if not p.is_floating_point():
                raise TypeError(f"parameter {i} has dtype {p.dtype}; only floating tensors can be averaged")
            if p.device != params[0].device:
                raise ValueError(f"parameter {i} is on {p.device}, parameter 0 on {params[0].device}: TWA keeps "
                                 "one basis of the whole model, so all parameters must be on one device")
            wide = p.dtype == torch.float64
            if self.storage_dtype is not None and wide != (self.storage_dtype == torch.float64):
                raise TypeError(f"parameter {i} is {p.dtype} but storage_dtype is {self.storage_dtype}: float64 "
                                "parameters need a float64 basis and other parameters a float32/bfloat16 one")
        # FSDP2/DTensor parameters: the basis holds this rank's shard of every row, and every
        # whole-model inner product is summed over the ranks (k values per projection).
        vectors = ShardedVectors(params)
        detached = [local_tensor(p.detach()) for p in params]
        basis = ops.new_basis(detached, self.capacity, dtype=self.storage_dtype)
        ops.validate("project_", detached, basis, 1)  # the ops' own checks (dtype pairs, layouts), now
        rtol = self._rtol if self._rtol is not None else max(default_rtol(b.dtype) for b in basis)
        self._vectors = vectors
        self._params = params
        self._basis = basis
        self._bf16 = self.storage_dtype == torch.bfloat16
        self.rtol = rtol
        self._scratch = None  # sized for the old parameters

    def _follow_params(self) -> None:
        """Makes TWA work on the parameters the base optimizer holds now: a parameter object
        replaced in ``param_groups`` takes its position (the basis rows are by position) when
        its shape and dtype still fit the basis; anything else raises before a change. Storage
        swapped under a parameter (``p.data = t``) needs nothing: the weights are re-read at
        each use. One C++ identity comparison per parameter when nothing changed."""
        changed = self._changed_params(self._params, "TWA has a basis of")
        if not changed:
            return
        current = self._flat_params()
        params = list(self._params)
        for i in changed:
            p = current[i]
            if not isinstance(p, torch.Tensor) or not p.is_floating_point():
                got = p.dtype if isinstance(p, torch.Tensor) else type(p).__name__
                raise TypeError(f"parameter {i} was replaced in param_groups by {got}, not a floating tensor")
            if p.shape != self._params[i].shape:
                raise ValueError(f"parameter {i} was replaced in param_groups by one of shape {list(p.shape)}; its "
                                 f"basis rows have shape {list(self._params[i].shape)}")
            params[i] = p
        detached = [local_tensor(p.detach()) for p in params]
        ops.validate("project_", detached, self._basis, 1)  # dtypes and layouts still pair with the basis
        self._vectors = ShardedVectors(params)
        self._params = params

    def _weights(self) -> List[torch.Tensor]:
        # Detached afresh at each use: `p.data = ...` (vector_to_parameters, Module.to) gives a
        # parameter new storage that a cached detached view would not see.
        return [local_tensor(p.detach()) for p in self._params]

    def _scratch_tensors(self) -> List[torch.Tensor]:
        if self._scratch is None:
            self._scratch = [torch.empty_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
                             for p in self._params]
        return self._scratch

    # ----------------------------------------------------------------- Optimizer interface

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """Adds a group to the base optimizer; only before the first ``collect()``.

        Atomic: if the base optimizer or the new basis refuses the group, the base's groups
        and this TWA's basis are left as they were."""
        if self._num_samples > 0 or self._in_subspace:
            raise RuntimeError("add_param_group after collect(): the basis vectors have no components for the "
                               "new parameters")
        groups = self.optimizer.param_groups
        count = len(groups)
        try:
            self.optimizer.add_param_group(param_group)
            self._build_basis()
        except BaseException:
            del groups[count:]  # (torch's add_param_group appends last, but a subclass may not)
            raise

    @torch.compiler.disable
    def _before_base_step(self, closure: Optional[Callable[[], Any]]) -> Optional[Callable[[], Any]]:
        self._follow_params()
        if not self._in_subspace:
            return closure
        if closure is None:
            self._project_grads()
        else:
            closure = self._projecting(closure)
        if self.reg:
            with torch.no_grad():
                torch._foreach_mul_(self._weights(), 1.0 - self.reg)
        return closure

    def _projecting(self, closure: Callable[[], Any]) -> Callable[[], Any]:
        def projected() -> Any:
            loss = closure()
            self._project_grads()
            return loss
        return projected

    @torch.compiler.disable
    @torch.no_grad()
    def _project_grads(self) -> None:
        grads = []
        for p in self._params:
            if p.grad is None:
                p.grad = torch.zeros_like(p, memory_format=torch.preserve_format)
            grads.append(local_tensor(p.grad))
        self._vectors.project_(grads, self._basis, self._k)

    # ----------------------------------------------------------------- collecting samples

    def _first_nonfinite(self, tensors: Sequence[torch.Tensor]) -> Optional[int]:
        """Position of the first tensor holding NaN/inf (the same on every rank), or None (syncs)."""
        bad = torch.stack([~torch.isfinite(t).all() for t in tensors])
        if self._vectors.is_sharded:
            bad = self._vectors.all_reduce(bad.to(torch.float32))
        where = bad.nonzero()
        return int(where[0]) if where.numel() else None

    def _check_sample_norm(self, srcs: Sequence[torch.Tensor], norm: float, row: Sequence[torch.Tensor]) -> None:
        """Raises unless the sample's norm is finite, after zeroing ``row`` (where it was written).
        A sum of squares is non-finite when an element is, or when it overflows: only then are
        the elements themselves checked, to tell the two apart."""
        if math.isfinite(norm):
            return
        for t in row:
            t.zero_()
        i = self._first_nonfinite(srcs)
        if i is None:
            dtype = torch.float64 if self._basis[0].dtype == torch.float64 else torch.float32
            raise ValueError(f"TWA sample {self._num_samples}: its squared norm overflows {dtype} (parameter "
                             "values too large); refused, nothing changed")
        raise _NonFiniteSample(f"parameter {i} (shape {list(srcs[i].shape)}) holds {_nonfinite_kind(srcs[i])}")

    @torch.no_grad()
    def _add_sample(self, srcs: Sequence[torch.Tensor]) -> Tuple[bool, float]:
        """Orthonormalizes the sample ``srcs`` against rows [0, k) into row k and adds its
        coefficients to the samples' sum; returns (accepted, relative residual). A refused
        sample leaves row k zero. A sample holding NaN/inf (_NonFiniteSample) or overflowing
        (ValueError) raises with row k zero and nothing else changed. Syncs (the residual)."""
        k = self._k
        row = [b[k] for b in self._basis]
        coefs: Optional[torch.Tensor] = None
        if not self._bf16:
            ops.scale_copy_(row, srcs, 1.0)
            original = self._vectors.norm(row)
            self._check_sample_norm(srcs, original, row)
            norm = self._vectors.orthonormalize_(self._basis, k)
        else:
            # The new direction is often smaller than bfloat16's rounding of the sample:
            # CGS2 on a float32 copy, and only the unit vector is rounded. The sample is then
            # exactly P @ coefs up to that rounding (P^T w would add the rows' departure from
            # orthonormality, ~1e-3 in bfloat16).
            work = self._scratch_tensors()
            ops.scale_copy_(work, srcs, 1.0)
            original = self._vectors.norm(work)
            self._check_sample_norm(srcs, original, [])
            coefs = torch.zeros(k + 1, dtype=torch.float64)
            for _ in range(2 if k else 0):
                c = self._vectors.dots(self._basis, work, k)
                ops.combine_(work, self._basis, c, -1.0, 1.0)
                coefs[:k] += c.double().cpu()
            norm = self._vectors.norm(work)
            coefs[k] = norm
        residual = norm / original if original > 0 else 0.0
        accepted = residual > self.rtol
        if not accepted:
            for t in row:
                t.zero_()
        elif self._bf16:
            ops.scale_copy_(row, work, 1.0 / norm)
        self._k += accepted
        if coefs is None:
            coefs = self._vectors.dots(self._basis, srcs, self._k).double().cpu() if self._k else coefs
        if self._k:
            self._coef_sum[: self._k] += coefs[: self._k]
        self._num_samples += 1
        return accepted, residual

    @torch.no_grad()
    def collect(self, skip_nonfinite: bool = False) -> bool:
        """Adds the current parameters to the basis (orthonormalized at once); returns True.

        A sample that adds no new direction (relative residual <= ``rtol``, e.g. the same
        weights twice) is refused with a :class:`RankDeficientSampleWarning` and False: the
        basis does not grow, but the sample still counts towards the mean that
        ``start_subspace("mean")`` starts from. Raises RuntimeError when the basis is full
        or after ``start_subspace()``. Syncs with the device (the residual is checked).

        Weights holding NaN/inf (a diverged step) raise ValueError naming the first such
        parameter; ``skip_nonfinite=True`` instead returns False with a
        :class:`NonFiniteSampleWarning`. Either way nothing changes: the basis, the counters
        and the mean are as before (the sample is not counted).
        """
        if not isinstance(skip_nonfinite, bool):
            raise TypeError(f"skip_nonfinite must be a bool, got {type(skip_nonfinite).__name__}")
        if self._in_subspace:
            raise RuntimeError("collect() after start_subspace(): the subspace is fixed while training in it")
        if self._k >= self.capacity:
            raise RuntimeError(f"collect(): the basis is full ({self.capacity} samples); make the TWA with a "
                               "larger capacity")
        self._follow_params()
        try:
            accepted, residual = self._add_sample(self._weights())
        except _NonFiniteSample as e:
            msg = f"TWA sample {self._num_samples}: {e}"
            if not skip_nonfinite:
                raise ValueError(f"{msg}; refused, nothing changed (collect(skip_nonfinite=True) skips such "
                                 "samples with a warning)") from None
            warnings.warn(f"{msg}; skipped (not counted), the basis keeps {self._k} vectors",
                          NonFiniteSampleWarning, stacklevel=3)
            return False
        if not accepted:
            warnings.warn(f"TWA sample {self._num_samples - 1} adds no new direction (relative residual {residual:.3g} "
                          f"<= rtol {self.rtol:g}); refused, the basis keeps {self._k} vectors",
                          RankDeficientSampleWarning, stacklevel=3)  # the caller, past torch.no_grad's wrapper
        return accepted

    @torch.no_grad()
    def start_subspace(self, init: str = "mean", reset_optimizer_state: bool = True) -> None:
        """Moves the weights into the span of the samples; later ``step()`` calls train in it.

        ``init="mean"``: the mean of all collected samples (the paper's head stage).
        ``init="current"``: the current weights projected onto the span, P P^T w (the tail
        stage starts from the last sample, which lies in the span: only rounding changes).
        ``reset_optimizer_state`` clears the base optimizer's state (momentum, Adam
        moments), whose full-space history would move the weights out of the span.
        BatchNorm statistics are not touched: run :func:`wavg_ext.update_bn` next.
        """
        if init not in _INITS:
            raise ValueError(f"init must be 'mean' or 'current', got {init!r}")
        if not isinstance(reset_optimizer_state, bool):
            raise TypeError(f"reset_optimizer_state must be a bool, got {type(reset_optimizer_state).__name__}")
        if self._in_subspace:
            raise RuntimeError("start_subspace() was already called")
        if self._k == 0:
            raise RuntimeError("start_subspace(): the basis is empty; collect() samples first")
        self._follow_params()
        k = self._k
        if init == "mean":
            ops.combine_(self._weights(), self._basis, self._coef_sum[:k] / self._num_samples, 1.0, 0.0)
        else:
            self._vectors.project_(self._weights(), self._basis, k)
        if reset_optimizer_state:
            self.optimizer.state.clear()
        self._in_subspace = True
        self._scratch = None

    # ----------------------------------------------------------------- public helpers

    @property
    def num_basis(self) -> int:
        """Basis vectors in use (accepted samples)."""
        return self._k

    @property
    def num_samples(self) -> int:
        """Samples collected so far, accepted or refused as rank deficient (the samples the mean is
        taken over); samples skipped for NaN/inf do not count."""
        return self._num_samples

    @property
    def in_subspace(self) -> bool:
        """Whether ``start_subspace()`` was called (steps project the gradients)."""
        return self._in_subspace

    @property
    def basis(self) -> List[torch.Tensor]:
        """The live basis: one ``[capacity, *p.shape]`` tensor per parameter; rows ``[0, num_basis)``
        are orthonormal (as one whole-model vector each), the others zero."""
        return list(self._basis)

    @torch.no_grad()
    def coefficients(self) -> torch.Tensor:
        """P^T w: the current weights' coordinates in the basis, float64 on the CPU (syncs)."""
        if self._k == 0:
            return torch.zeros(0, dtype=torch.float64)
        return self._vectors.dots(self._basis, self._weights(), self._k).double().cpu()

    # ----------------------------------------------------------------- checkpoints

    def _config(self) -> Dict[str, Any]:
        return {"capacity": self.capacity, "reg": self.reg,
                "storage_dtype": None if self.storage_dtype is None else str(self.storage_dtype),
                "rtol": self.rtol}

    def state_dict(self, optimizer: bool = True) -> Dict[str, Any]:
        """Base optimizer state, the basis (by parameter position), the counters, the samples'
        coefficient sum and the settings. The basis tensors are the live ones: save or clone them.
        ``optimizer=False`` leaves out the base optimizer's state (load with
        ``load_state_dict(sd, optimizer=False)``)."""
        return self._state({
            "version": self._state_version,
            "method": self.method,
            "config": self._config(),
            "num_basis": self._k,
            "num_samples": self._num_samples,
            "in_subspace": self._in_subspace,
            "coefficient_sum": self._coef_sum,
            # DTensors for DTensor parameters (sharded like them, for torch.distributed.checkpoint)
            "basis": [basis_like_param(b, p) for b, p in zip(self._basis, self._params)],
        }, optimizer)

    def load_state_dict(self, state_dict: Dict[str, Any], optimizer: bool = True) -> None:
        """Restores a ``state_dict()``; everything is checked before anything is changed.

        Load the model's weights as well (``model.load_state_dict``): they are not part of it.
        """
        twa = self._saved_section(state_dict, optimizer)
        basis = twa.get("basis")
        if isinstance(basis, (list, tuple)):
            basis = [local_tensor(b) if isinstance(b, torch.Tensor) else b for b in basis]
        if not isinstance(basis, (list, tuple)) or len(basis) != len(self._basis):
            got = len(basis) if isinstance(basis, (list, tuple)) else type(basis).__name__
            raise ValueError(f"state dict has a basis of {got} tensors, this TWA {len(self._basis)}")
        _check_saved_tensors("basis", basis, self._basis)
        for key in ("num_basis", "num_samples", "in_subspace", "coefficient_sum"):
            if key not in twa:
                raise ValueError(f"state dict['twa'] has no '{key}'")
        k, n, in_subspace = twa["num_basis"], twa["num_samples"], twa["in_subspace"]
        coef = twa["coefficient_sum"]
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= self.capacity:
            raise ValueError(f"state dict num_basis {k!r} is not an int in [0, {self.capacity}]")
        if isinstance(n, bool) or not isinstance(n, int) or n < k:
            raise ValueError(f"state dict num_samples {n!r} is not an int >= num_basis ({k})")
        if not isinstance(in_subspace, bool) or (in_subspace and k == 0):
            raise ValueError(f"state dict in_subspace {in_subspace!r} is not a bool (or True with an empty basis)")
        _check_saved_tensors("coefficient_sum", [coef], [self._coef_sum])
        for kind, tensors in (("basis", basis), ("coefficient_sum", [coef])):
            for i, t in enumerate(tensors):
                if t.layout != torch.strided or t.is_meta:
                    raise ValueError(f"state dict {kind}[{i}] is a {t.layout} {t.device.type} tensor, not a dense one "
                                     "with data")
        # The rows in use and the sum must be finite (a NaN there would spread into every step).
        for i, b in enumerate(basis):
            if not bool(torch.isfinite(b[:k]).all()):
                raise ValueError(f"state dict basis[{i}] holds {_nonfinite_kind(b[:k])} in its rows [0, {k})")
        if not bool(torch.isfinite(coef).all()):
            raise ValueError(f"state dict coefficient_sum holds {_nonfinite_kind(coef)}")
        # Everything is checked; should a copy still fail, the basis goes back (and
        # _load_base_then puts the base optimizer back).
        rows_before = [b[: self._k].clone() for b in self._basis]  # rows >= num_basis are zero
        coef_before = self._coef_sum.clone()

        def commit() -> None:
            try:
                with torch.no_grad():
                    for s, d in zip(basis, self._basis):  # rows >= k zeroed: they are by construction
                        d[:k].copy_(s[:k])
                        d[k:].zero_()
                    self._coef_sum.copy_(coef)
            except BaseException:
                with torch.no_grad():
                    for r, d in zip(rows_before, self._basis):
                        d[: r.shape[0]].copy_(r)
                        d[r.shape[0]:].zero_()
                    self._coef_sum.copy_(coef_before)
                raise

        self._load_base_then(state_dict, optimizer, commit)
        self._k, self._num_samples, self._in_subspace = k, n, in_subspace
        self._scratch = None

    # ----------------------------------------------------------------- from saved checkpoints

    @classmethod
    def from_checkpoints(cls, model: nn.Module, optimizer: Optimizer, checkpoints: Sequence[Checkpoint],
                         capacity: Optional[int] = None, reg: float = 1e-5,
                         storage_dtype: Optional[torch.dtype] = None, rtol: Optional[float] = None,
                         init: str = "mean", reset_optimizer_state: bool = True,
                         skip_nonfinite: bool = False) -> "TWA":
        """A TWA whose basis holds saved checkpoints, already in the subspace (``start_subspace(init)``).

        ``checkpoints``: a list of model state dicts or paths to them (loaded with
        ``torch.load(weights_only=True)`` onto the parameters' device). A checkpoint may
        also be a dict holding the model's state dict under ``"state_dict"`` or
        ``"model"``; keys may carry a ``"module."`` prefix (DataParallel/DDP). The
        optimizer's parameters are found in each checkpoint by their names in
        ``model.named_parameters()``; other entries (buffers, optimizer state) are ignored.

        Every checkpoint is checked (names, shapes, finite values) before the model or the
        optimizer is written, so a bad one raises ValueError/TypeError and leaves them
        untouched; a checkpoint holding NaN/inf (or, for a float32 basis, float64 values
        beyond float32's range) is dropped with a :class:`NonFiniteSampleWarning` instead
        with ``skip_nonfinite=True`` (it does not count towards the mean). Should a later
        step fail, the parameters and the base optimizer are restored from a copy taken
        before (one model-sized buffer). Checkpoints that add no new direction are dropped
        with a :class:`RankDeficientSampleWarning`. ``init="mean"`` starts from the mean of
        all checkpoints (projected onto their span); ``init="current"`` from the model's
        weights projected onto the span (e.g. the pretrained model of the paper's ImageNet
        runs). ``capacity`` defaults to ``len(checkpoints)``. BatchNorm statistics are not
        loaded: run :func:`wavg_ext.update_bn`.

        With a float32 or float64 basis (not sharded), each checkpoint is read once: its
        entries are checked, copied into the next basis row and the row checked for NaN/inf;
        then the mean is taken from the rows (into one temporary model-sized buffer) and the
        rows are orthonormalized together (:func:`wavg_ext.ops.orthonormalize_many_`). Peak
        memory: the basis, the mean and one checkpoint (files are memory-mapped on the CPU:
        read in place from the page cache). With a bfloat16 basis (orthonormalized one by
        one in float32 as ``collect()`` does) or an FSDP2-sharded model, every checkpoint is
        checked in a first pass and loaded in a second (a file that can no longer be read
        then restores the model and optimizer).
        """
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if init not in _INITS:
            raise ValueError(f"init must be 'mean' or 'current', got {init!r}")
        if isinstance(checkpoints, (str, os.PathLike, Mapping)) or not isinstance(checkpoints, Sequence):
            raise TypeError(f"checkpoints must be a list of state dicts or paths, got {type(checkpoints).__name__}")
        checkpoints = list(checkpoints)
        n = len(checkpoints)
        if n == 0:
            raise ValueError("checkpoints is empty")
        capacity = n if capacity is None else _check_int("capacity", capacity, 1)
        if capacity < n:
            raise ValueError(f"capacity {capacity} < {n} checkpoints")
        twa = cls(optimizer, capacity, reg=reg, storage_dtype=storage_dtype, rtol=rtol)
        if not isinstance(reset_optimizer_state, bool):
            raise TypeError(f"reset_optimizer_state must be a bool, got {type(reset_optimizer_state).__name__}")
        if not isinstance(skip_nonfinite, bool):
            raise TypeError(f"skip_nonfinite must be a bool, got {type(skip_nonfinite).__name__}")
        by_id = {id(p): name for name, p in model.named_parameters()}
        names = [by_id.get(id(p)) for p in twa._params]
        strangers = [i for i, name in enumerate(names) if name is None]
        if strangers:
            raise ValueError(f"optimizer parameter(s) {strangers[:5]} are not parameters of model")
        if not twa._bf16 and not twa._vectors.is_sharded:
            # One read per checkpoint, straight into the basis (not yet anyone's state).
            n_kept, skipped = twa._load_rows(checkpoints, names, skip_nonfinite)
            mean = twa._mean_of_rows(n_kept)  # before orthonormalizing overwrites the rows
            dropped = twa._orthonormalize_rows(n_kept, mean)
            del mean
            for msg in skipped:  # (a call that fails warns of nothing)
                warnings.warn(f"{msg}; dropped (not counted in the mean)", NonFiniteSampleWarning, stacklevel=2)
            if dropped:
                warnings.warn(dropped, RankDeficientSampleWarning, stacklevel=2)
            weights_before = [w.clone() for w in twa._weights()]
            base_before = copy.deepcopy(optimizer.state_dict())
            try:
                twa.start_subspace(init, reset_optimizer_state)
            except BaseException:
                twa._restore(weights_before, base_before)
                raise
            return twa
        kept, skipped, nonzero = [], [], False
        for i, ckpt in enumerate(checkpoints):  # everything checked before anything is written
            try:
                tensors = twa._read_checkpoint(ckpt, i, names, check_only=True)
            except _NonFiniteSample as e:
                if not skip_nonfinite:
                    raise ValueError(f"{e} (skip_nonfinite=True drops such checkpoints with a warning)") from None
                skipped.append(str(e))
                continue
            nonzero = nonzero or any(bool(t.any()) for t in tensors)
            kept.append(ckpt)
            del tensors
        if not kept:
            raise ValueError(f"every checkpoint ({n}) holds NaN/inf values: there is nothing to average")
        if not nonzero:
            raise ValueError("every checkpoint's parameters are zero: there is no subspace to train in")
        for msg in skipped:
            warnings.warn(f"{msg}; dropped (not counted in the mean)", NonFiniteSampleWarning, stacklevel=2)
        # Checked; a failure from here on (a file that no longer loads) restores what was written.
        weights_before = [w.clone() for w in twa._weights()]
        base_before = copy.deepcopy(optimizer.state_dict())
        try:
            twa._load_checkpoints(kept, names, init)
            twa.start_subspace(init, reset_optimizer_state)
        except BaseException:
            twa._restore(weights_before, base_before)
            raise
        return twa

    @torch.no_grad()
    def _restore(self, weights_before: Sequence[torch.Tensor], base_before: dict) -> None:
        for w, saved in zip(self._weights(), weights_before):
            w.copy_(saved)
        self.optimizer.load_state_dict(base_before)

    @torch.no_grad()
    def _load_rows(self, checkpoints: Sequence[Checkpoint], names: Sequence[str],
                   skip_nonfinite: bool) -> Tuple[int, List[str]]:
        """Checks every checkpoint and copies the kept ones into basis rows [0, n_kept),
        reading each once: names, shapes and layouts from its entries, then a fused copy
        into the next row and a fused NaN/inf check of that row (which also catches float64
        values beyond float32's range). Only the basis is written (a bad checkpoint raises
        before the user's model or optimizer is touched). Returns (n_kept, the skipped ones'
        messages)."""
        n_kept, skipped = 0, []
        for i, ckpt in enumerate(checkpoints):
            tensors = self._read_checkpoint(ckpt, i, names, check_only=True, check_values=False)
            rows = [b[n_kept] for b in self._basis]
            ops.scale_copy_(rows, [t.to(device=r.device, dtype=r.dtype) for t, r in zip(tensors, rows)], 1.0)
            if int(ops.nonfinite_flag(rows)):
                msg = self._nonfinite_message(self._where(ckpt, i), names, tensors, rows)
                for r in rows:
                    r.zero_()  # (a later checkpoint may not overwrite it)
                if not skip_nonfinite:
                    raise ValueError(f"{msg} (skip_nonfinite=True drops such checkpoints with a warning)")
                skipped.append(msg)
                continue
            n_kept += 1
        if n_kept == 0:
            raise ValueError(f"every checkpoint ({len(checkpoints)}) holds NaN/inf values: there is nothing to "
                             "average")
        return n_kept, skipped

    @staticmethod
    def _nonfinite_message(where: str, names: Sequence[str], tensors: Sequence[torch.Tensor],
                           rows: Sequence[torch.Tensor]) -> str:
        for name, t, r in zip(names, tensors, rows):
            if not bool(torch.isfinite(r).all()):
                if bool(torch.isfinite(t).all()):
                    return f"{where}: '{name}' holds values beyond the range of the basis' {r.dtype}"
                return f"{where}: '{name}' holds {_nonfinite_kind(t)}"
        return f"{where} holds NaN/inf"  # (not reached: the flag came from these rows)

    @torch.no_grad()
    def _mean_of_rows(self, n: int) -> List[torch.Tensor]:
        """The mean of basis rows [0, n) in fresh tensors of the basis' dtype: one read of the rows."""
        mean = [torch.empty_like(b[0]) for b in self._basis]
        coeffs = torch.full((n,), 1.0 / n, dtype=torch.float64, device=self._basis[0].device)
        ops.combine_(mean, self._basis, coeffs, 1.0, 0.0)
        return mean

    @torch.no_grad()
    def _orthonormalize_rows(self, n: int, mean: Sequence[torch.Tensor]) -> str:
        """Orthonormalizes basis rows [0, n) (the n kept checkpoints) and records the sum of
        their coefficients (n times the mean's); raises ValueError when none is left.
        Returns the warning for rows dropped as adding no new direction ("" if none)."""
        res = ops.orthonormalize_many_(self._basis, 0, n, rtol=self.rtol, vectors=self._vectors)
        if res.accepted == 0:
            if bool((res.residuals == 0).all()):
                raise ValueError("every checkpoint's parameters are zero: there is no subspace to train in")
            raise ValueError("every checkpoint's parameters are zero or too small to normalize: there is no "
                             "subspace to train in")
        self._k = res.accepted
        self._num_samples = n
        self._coef_sum[: self._k] = n * self._vectors.dots(self._basis, mean, self._k).double().cpu()
        self._scratch = None
        return self._dropped_message(n) if res.accepted < n else ""

    def _dropped_message(self, n: int) -> str:
        """The RankDeficientSampleWarning of n checkpoints of which self._k were kept."""
        return (f"{n - self._k} of {n} checkpoints add no new direction (relative residual <= rtol "
                f"{self.rtol:g}) and were dropped; the basis has {self._k} vectors")

    @staticmethod
    def _where(ckpt: Checkpoint, i: int) -> str:
        return f"checkpoints[{i}]" + (f" ({os.fspath(ckpt)})" if isinstance(ckpt, (str, os.PathLike)) else "")

    def _read_checkpoint(self, ckpt: Checkpoint, i: int, names: Sequence[str],
                         check_only: bool = False, check_values: bool = True) -> List[torch.Tensor]:
        """The parameters' tensors in checkpoint i, in parameter order (ValueError/TypeError
        naming the checkpoint and key for anything missing or mismatched; with check_only,
        also non-dense tensors and, with check_values, NaN/inf)."""
        where = self._where(ckpt, i)
        # Memory-mapped onto the CPU to check, and to load for CPU parameters (no copy into
        # fresh memory); loaded onto the parameters' device otherwise.
        obj = load_checkpoint(ckpt, where, "cpu" if check_only else self._params[0].device)
        out, missing = [], []
        for name, p in zip(names, self._params):
            t = obj.get(name, obj.get("module." + name))
            if t is None:
                missing.append(name)
                continue
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
                raise TypeError(f"{where}: '{name}' is {got}, not a floating tensor")
            if t.shape != p.shape:
                raise ValueError(f"{where}: '{name}' has shape {list(t.shape)}, the model's parameter "
                                 f"{list(p.shape)}")
            if check_only and (t.layout != torch.strided or t.is_meta):
                raise ValueError(f"{where}: '{name}' is a {t.layout} {t.device.type} tensor, not a dense one "
                                 "with data")
            out.append(t)
        if missing:
            raise ValueError(f"{where} has no parameter(s) {missing[:5]}"
                             f"{f' (and {len(missing) - 5} more)' if len(missing) > 5 else ''}; "
                             f"its keys begin {list(obj)[:3]}")
        if check_only and check_values:  # after the names and shapes: those errors come first
            # One fused, threaded pass over the whole checkpoint (ops.nonfinite_flag) instead
            # of a bool tensor per parameter; the per-tensor search only names a bad one.
            fused = all(t.dtype in ops.FLOAT_DTYPES for t in out)  # (others: torch.isfinite)
            if not fused or int(ops.nonfinite_flag(out)):
                for name, t in zip(names, out):
                    if not bool(torch.isfinite(t).all()):
                        raise _NonFiniteSample(f"{where}: '{name}' holds {_nonfinite_kind(t)}")
        return out

    @torch.no_grad()
    def _load_checkpoints(self, checkpoints: Sequence[Checkpoint], names: Sequence[str], init: str) -> None:
        n = len(checkpoints)
        weights = self._weights()
        mean: List[torch.Tensor] = []
        if not self._bf16:  # the samples' mean, for its coefficients (a bfloat16 basis gets them from CGS)
            mean = weights if init == "mean" else \
                [torch.empty_like(p, memory_format=torch.preserve_format) for p in weights]
        for i, ckpt in enumerate(checkpoints):
            srcs = [local_part(t, param).to(device=w.device, dtype=w.dtype)
                    for t, param, w in zip(self._read_checkpoint(ckpt, i, names), self._params, weights)]
            if self._bf16:
                self._add_sample(srcs)  # collect()'s float32 Gram-Schmidt, checkpoint by checkpoint
            else:
                ops.running_mean_(mean, srcs, i)
                ops.scale_copy_([b[i] for b in self._basis], srcs, 1.0)
            del srcs
        if not self._bf16:
            self._k = ops.orthonormalize_many_(self._basis, 0, n, rtol=self.rtol, vectors=self._vectors).accepted
            self._num_samples = n
            if self._k:
                self._coef_sum[: self._k] = n * self._vectors.dots(self._basis, mean, self._k).double().cpu()
        if self._k < n:
            warnings.warn(self._dropped_message(n), RankDeficientSampleWarning, stacklevel=4)  # from_checkpoints' caller
        if self._k == 0:  # (zeros are refused up front: here, norms that underflow)
            raise ValueError("every checkpoint's parameters are zero or too small to normalize: there is no "
                             "subspace to train in")
        self._scratch = None
