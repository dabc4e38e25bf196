"""The run's parameters: the typed schema of ``params.yaml`` (:mod:`~mechdiff.params.config`), reading raw values into
it (:mod:`~mechdiff.params.parse`), the constraints table and its one validator (:mod:`~mechdiff.params.rules`), and
the two editors of its ``pairs:`` section (:mod:`~mechdiff.params.preset`, shipped presets;
:mod:`~mechdiff.params.pair`, one pair at a time). The ``check_params`` stage runs the validation before any other
stage.
"""
