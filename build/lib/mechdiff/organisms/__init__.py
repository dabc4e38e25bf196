"""The embedded model organisms with known answers: the synthetic bilingual world (:mod:`~mechdiff.organisms.world`)
and its tokenizers (:mod:`~mechdiff.organisms.tokenizer_build`), the training loop and low-rank adapters
(:mod:`~mechdiff.organisms.training`, :mod:`~mechdiff.organisms.lora`), building the base, cultural and cognitive
organisms (:mod:`~mechdiff.organisms.build_models`, the ``build_models`` stage), planted edits of a given model
(:mod:`~mechdiff.organisms.planted`), the world's behavioural measures (:mod:`~mechdiff.organisms.world_measures`) and
the check of a run's results against the planted truth (:mod:`~mechdiff.organisms.planted_truth`).
"""
