"""RQ3, is the change a low-rank handle: rank-k subspaces (:mod:`~mechdiff.rq3.subspace`) fitted on dev
(:mod:`~mechdiff.rq3.steer_fit`), ablated in the tuned model and added to the base, every (k, alpha) with random
controls (:mod:`~mechdiff.rq3.steer_sweep`, the ``steer_sweep`` stage, measured by
:mod:`~mechdiff.rq3.steer_measures`), the minimal k chosen on dev and reported on test
(:mod:`~mechdiff.rq3.steer_select`, the ``steer_select`` stage); and head importance by ablation and cross-model
swap (:mod:`~mechdiff.rq3.head_patch`, the ``head_patch`` stage, with :mod:`~mechdiff.rq3.head_sweep` and
:mod:`~mechdiff.rq3.head_stats`).
"""
