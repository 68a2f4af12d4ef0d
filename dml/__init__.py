"""dml: proxy-based deep metric learning on top of vmf_dists (the trainer arrives in a later issue).

Depends on vmf_dists; vmf_dists never imports dml.
"""
