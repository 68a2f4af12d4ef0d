"""dml: proxy-based deep metric learning on top of vmf_dists; the trainer is ``python -m dml.train``.

Subpackages and modules: `dml.data` (splits, images, transforms, class-balanced sampling),
`dml.models` (backbones and the embedding head), `dml.losses` (one proxy loss per module, one call
signature), `dml.metrics` (retrieval and clustering metrics), `dml.pipeline`, `dml.checkpoint`,
`dml.config` and `dml.train`. Depends on vmf_dists; vmf_dists never imports dml.
"""
