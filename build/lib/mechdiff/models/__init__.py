"""Models, hooks and capture: loading a model (:mod:`~mechdiff.models.load`; the organisms' source model,
:mod:`~mechdiff.models.source_model`), the architecture adapter (:mod:`~mechdiff.models.architecture`), hooks that
always come off (:mod:`~mechdiff.models.hooks`), capture (:mod:`~mechdiff.models.capture`) and the ``collect_acts``
stage's plan (:mod:`~mechdiff.models.collect_acts`), activation patching and interventions
(:mod:`~mechdiff.models.patching`, :mod:`~mechdiff.models.interventions`), measures of one model on token rows
(:mod:`~mechdiff.models.measures`), and the batch-size, out-of-memory and pre-flight guards
(:mod:`~mechdiff.models.batch_size`, :mod:`~mechdiff.models.oom`, :mod:`~mechdiff.models.preflight`).
"""
