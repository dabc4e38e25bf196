"""mechdiff: fair, causal, reproducible diffing of a base LLM against a fine-tuned derivative.

The library is grouped by concern; a DVC stage's science is the module of the stage's name (the ``fit_clt``
stage: ``stages/fit_clt.py`` calls :mod:`mechdiff.rq2.fit_clt`):

* :mod:`mechdiff.params`: the schema, reading and constraints of ``params.yaml``; presets and pair editing.
* :mod:`mechdiff.data`: prompt sources by format, the prompt schema, targets, rendering, answer judging.
* :mod:`mechdiff.fairness`: tokenizers and the cross-tokenizer fairness contract.
* :mod:`mechdiff.models`: loading, the architecture adapter, hooks, capture, patching, interventions, measures.
* :mod:`mechdiff.organisms`: the embedded model organisms, their world, planted edits and planted truth.
* :mod:`mechdiff.rq1` to :mod:`mechdiff.rq4`: the four research questions (behaviour gap, CKA and layer
  patching; the cross-model linear transfer; steering and head patching; attribution and head churn).
* :mod:`mechdiff.report`: the report's numbers, cards, tables, figures and rendering.
* :mod:`mechdiff.verdict` (the verdict rules), :mod:`mechdiff.stats` (the one prompt-level bootstrap),
  :mod:`mechdiff.fingerprint` (what an artifact was computed from), :mod:`mechdiff.errors`.
"""

__version__ = "0.1.0"
