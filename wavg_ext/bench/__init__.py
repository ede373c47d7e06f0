"""Benchmarks of wavg_ext: ``python -m wavg_ext.bench`` (the command line: :mod:`.__main__`).

- :mod:`.common`: shape sets, dtype configs, bandwidth ceilings, timing loops, formatting
  and the environment a run reports, shared by the suites;
- the suites, each importing only :mod:`.common` and wavg_ext's public modules:
  :mod:`.ops` (the fused averaging ops vs pure PyTorch), :mod:`.wrappers` (the optimizer
  wrappers' per-step overhead), :mod:`.twa` (projection and orthonormalization),
  :mod:`.trust` (the model check, float64/compensated averages, ``skip_nonfinite``) and
  :mod:`.distributed` (sharded TWA vs the paper's all-reduce:
  ``torchrun --nproc_per_node=2 -m wavg_ext.bench.distributed``).

Nothing is imported here, so that ``python -m wavg_ext.bench.distributed`` runs its module
once, as ``__main__``.
"""
