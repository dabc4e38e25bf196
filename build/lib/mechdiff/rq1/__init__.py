"""RQ1, where the models differ: the behavioural gap on the same prompts (:mod:`~mechdiff.rq1.behaviour`, the
``behaviour`` stage); layer-wise linear CKA with its permutation null and prompt bootstrap
(:mod:`~mechdiff.rq1.layer_scan`, the ``cka`` stage, on :mod:`~mechdiff.rq1.cka` and :mod:`~mechdiff.rq1.hsic`) and
the rank of the change per layer (:mod:`~mechdiff.rq1.change_rank`); cross-model layer patching and the choice of
layers for RQ2-RQ4 (:mod:`~mechdiff.rq1.layer_patch`, the ``layer_patch`` stage, with
:mod:`~mechdiff.rq1.layer_refine` and :mod:`~mechdiff.rq1.layer_entry`).
"""
