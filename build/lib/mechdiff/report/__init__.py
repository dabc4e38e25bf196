"""The report: what each fine-tune changed, read off every pair's finished results (no model runs). It holds the
verdict card per pair (the label, one sentence and the three numbers the verdict rests on), the headline table
with 95% intervals, figures A-D, per-pair evidence and the method notes, assembled once as format-independent
blocks and written as Markdown and as one self-contained HTML page; plus every headline number per pair
(``headline.json``), the short ``dvc metrics show`` row per pair and the curves for ``dvc plots show``. The
verdict rules themselves are :mod:`mechdiff.verdict`'s; the report stage (``stages/report.py``) reads the
results and writes the files.

Modules: :mod:`~mechdiff.report.numbers` (headline numbers and metrics rows from one pair's results),
:mod:`~mechdiff.report.formatting` (numbers with intervals, measure and criterion names, shared phrases),
:mod:`~mechdiff.report.cards` (the verdict card), :mod:`~mechdiff.report.tables` (headline, criteria and
behaviour tables), :mod:`~mechdiff.report.document` (the report as blocks, its paragraphs and notes),
:mod:`~mechdiff.report.render_markdown` and :mod:`~mechdiff.report.render_html` (the blocks as report.md and
report.html), :mod:`~mechdiff.report.figures` (figures A-D as matplotlib Figures) and
:mod:`~mechdiff.report.plot_data` (tidy rows for ``dvc plots``).
"""
