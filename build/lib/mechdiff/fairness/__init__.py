"""Tokenizers and the cross-tokenizer fairness contract: loading a tokenizer
(:mod:`~mechdiff.fairness.tokenizer_load`), comparing two vocabularies and building the id map
(:mod:`~mechdiff.fairness.vocab`), comparing segmentations per prompt (:mod:`~mechdiff.fairness.alignment`), masking
logits to the shared vocabulary (:mod:`~mechdiff.fairness.masking`) and applying the contract to a pair's prompts
(:mod:`~mechdiff.fairness.filter_shared`, the ``filter_shared`` stage).
"""
