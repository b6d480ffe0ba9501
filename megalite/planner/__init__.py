"""Planning a job before it runs: which layout fits and how fast it goes.

- ``dry_run``: one rank of the real job (``ParallelDims`` on torch's fake process group, the
  model / TP plan / pipeline cut / ZeRO engine / optimizer on fake tensors), one step under a
  memory tracker: ``megalite train ... --dry_run``.
- ``memory``: the analytic memory model per GPU, each term named.
- ``time``: the analytic step-time model (roofline + collectives + pipeline bubble).
- ``search``: enumerate layouts, keep those ``validate()`` accepts, rank them:
  ``megalite plan``.

Not to be confused with ``megalite.plan``, the *parallel plan* of a run (TP + pipeline cut).
"""
