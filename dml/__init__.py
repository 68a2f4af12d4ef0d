"""dml: proxy-based deep metric learning on top of vmf_dists; the trainer is ``python -m dml.train``.

Modules, in the order data flows through a run (see the docs' Architecture page): `dml.config`
(options, choices, validation), `dml.build` (config → model, loss, pipeline, sampler, optimizer,
scheduler), `dml.trainer` (the loop, state, checkpoints), `dml.final_eval` (the one test evaluation),
`dml.report`; with `dml.data` (splits, images, transforms, degradations, sampling), `dml.models`,
`dml.losses`, `dml.pipeline`, `dml.metrics`, `dml.uncertainty`, `dml.runtime` (device, lock, signals,
allocator), `dml.distributed` and `dml.checkpoint`. The command lines are `dml.train` and
`dml.evaluate`. Depends on vmf_dists; vmf_dists never imports dml.
"""

from vmf_dists import __version__  # one version for the whole distribution (pyproject reads it from vmf_dists)

__all__ = ["__version__"]
