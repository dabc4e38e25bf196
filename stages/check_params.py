"""Stage check_params: validate params.yaml before any other stage may delete its outputs.

    python -m stages.check_params --out artifacts/results/params_check.json

DVC deletes a stage's outputs before it runs the stage's command, so a bad value found by that stage
(``report.null_kl_max: -1``) or a command that cannot even start (``dvc`` run outside the project's
environment) would cost its finished outputs, and ``cache: false`` outputs (the report, the headline
files) cannot be restored. Every other stage depends on this stage's output, so ``dvc repro`` and
``dvc exp run -S`` stop here, with one line naming the key, before any other output is touched.

The output holds no param value (the same bytes whenever the params are valid), so an edit reruns this
one-second check and then only the stages that track the edited key.
"""

from __future__ import annotations

import sys

from mechdiff.params.rules import uses_organism
from stages.common import atomic_write_json, load_stage_params, run_stage, stage_parser

VALID = {"params": "valid", "checked_by": "stages/check_params.py (every stage depends on this file)"}


def main() -> None:
    args = stage_parser(__doc__, "--out", raw_doc=True).parse_args()
    params = load_stage_params(args.params)
    atomic_write_json(args.out, VALID)
    print(f"check_params: {args.params} is valid ({len(params.pairs)} pairs: {', '.join(params.pairs)})")
    used = any(uses_organism(m) for p in params.pairs.values() for m in (p.base, p.tuned))
    if params.organisms.build and not used:
        print("check_params: no pair uses the embedded organisms, yet organisms.build is true: set it to false "
              "so that build_models does not train them", file=sys.stderr)


if __name__ == "__main__":
    run_stage(main)
