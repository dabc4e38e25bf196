"""Prompts and answers: reading a pair's datasets in any supported format (:mod:`~mechdiff.data.source_files`),
normalising their records into the one prompt schema (:mod:`~mechdiff.data.prompt_rows`,
:mod:`~mechdiff.data.prompt_schema`) and assembling the pair's prompt set with its dev/test split
(:mod:`~mechdiff.data.prepare_data`, the ``prepare_data`` stage); the pair's target and contrast class
(:mod:`~mechdiff.data.target`); rendering prompts with exactly one BOS (:mod:`~mechdiff.data.rendering`); and
judging a model's answer against a reference (:mod:`~mechdiff.data.answers`).
"""
