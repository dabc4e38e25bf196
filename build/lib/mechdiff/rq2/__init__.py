"""RQ2, the ``fit_clt`` stage: a cross-model linear transfer, the linear map from the base model's residual states to
the tuned model's at one layer (the seed calls it CLT; it is not a cross-layer transcoder). The map and its scores
(:mod:`~mechdiff.rq2.linear_map`, solved for a whole ridge grid by :mod:`~mechdiff.rq2.ridge`), the stage's fits and
controls (:mod:`~mechdiff.rq2.fit_clt`) and the causal check, mapped patch vs real patch
(:mod:`~mechdiff.rq2.mapped_patch`).
"""
