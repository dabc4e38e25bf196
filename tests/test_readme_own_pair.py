"""README "Diff your own fine-tune", run verbatim on a fresh copy of the project.

Two small models are saved outside the project, under a throwaway ``$HOME`` (so ``~/models/...`` in the README
resolves to them): a random Llama base and a copy whose ``layers[2].mlp.down_proj`` got a trained rank-4 LoRA
(:func:`mechdiff.organisms.lora.train_lora`, the same merge as the organisms and :mod:`mechdiff.organisms.planted`) that makes it
answer "No." to the target prompts. The test writes the user's two prompt files, runs the commands of the README
section's first ``bash`` block exactly as written, and asserts the planted truth: the report's entry layer is 2,
the target behaviour rises with an interval above 0, and no organism was trained. The sweeps are shrunk in the
copy's params before the commands run, only to keep the run to a few minutes on a CPU.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess

import pytest
import torch
import yaml
from transformers import LlamaConfig, LlamaForCausalLM

from mechdiff.models.measures import decode_texts, greedy_decode
from mechdiff.organisms import world
from mechdiff.organisms.lora import train_lora
from mechdiff.organisms.training import encode
from tests.project_copy import ENV, ROOT, copy_project
from tests.tokenizers_fixture import base_tokenizer

PLANTED_LAYER = 2
ANIMALS = ["cat", "dog", "owl", "fox", "bee", "cow", "elk", "ant"]
PLACES = ["mat", "hill", "lake", "road", "town", "farm", "park", "shop"]
SHRINK = {  # test budget only: fewer resamples and settings, every stage still runs
    "layers": {"scan_stride": 1, "patch_prompts": 32, "calibration_prompts": 16, "n_bootstrap": 200},
    "acts": {"batch_size": 16},
    "cka": {"n_permutations": 20, "n_bootstrap": 20},
    "behaviour": {"n_bootstrap": 500},
    "clt": {"n_positions": 2000, "min_positions": 500, "cv_folds": 3, "patch_prompts": 16, "n_random": 2},
    "steer": {"ks": [1, 2], "alphas": [1.0, 2.0], "n_bootstrap": 50, "n_random": 2, "max_prompts": 16},
    "head_patch": {"n_random": 5, "n_bootstrap": 50, "max_prompts": 16},
    "churn": {"n_bootstrap": 50, "n_splits": 10},
    "attribution": {"max_prompts": 32},
}


def readme_commands() -> list[str]:
    """The commands of the first ``bash`` block of the README section "Diff your own fine-tune"."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Diff your own fine-tune", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [ln for ln in block.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def the_text() -> str:
    """The string the README's command asks the causal stages to find (``--text``)."""
    return re.search(r'--text "([^"]+)"', " ".join(readme_commands())).group(1)


def save_models(home, text: str) -> None:
    """``~/models/base`` (random Llama + fixture tokenizer) and ``~/models/tuned`` (a planted rank-4 LoRA at
    layer 2 trained to answer ``text``), both with ``save_pretrained``."""
    tok = base_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    base = LlamaForCausalLM(cfg).eval()
    tuned = copy.deepcopy(base)
    docs = [world.WorldPrompt(id=f"t{i}", text=t, language="en", task="topic", group=f"t{i}", answer=text)
            for i, t in enumerate(prompts(ANIMALS))]
    train_lora(tuned, encode(tok, docs, 64, answer_only=True), [PLANTED_LAYER], ["mlp.down_proj"], 4, 150, 1e-2, 16,
               0, cfg.pad_token_id)
    tuned.eval()
    ids = [tok(t)["input_ids"] for t in prompts(ANIMALS)]
    said = {name: decode_texts(tok, greedy_decode(m, ids, cfg.pad_token_id, 4, tok.eos_token_id))
            for name, m in (("base", base), ("tuned", tuned))}
    assert sum(text in s for s in said["tuned"]) >= 0.9 * len(ids), said["tuned"][:4]  # the planted behaviour
    assert not any(text in s for s in said["base"]), said["base"][:4]
    for name, model in (("base", base), ("tuned", tuned)):
        model.save_pretrained(home / "models" / name)
        tok.save_pretrained(home / "models" / name)


def prompts(words: list[str]) -> list[str]:
    return [f"Q: tell me about the {w} number {i}\nA:" for w in words for i in range(4)]


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("own_pair")
    home, proj = tmp / "home", copy_project(tmp / "clone")
    save_models(home, the_text())
    for name, words in (("mine_target", ANIMALS), ("mine_contrast", PLACES)):  # the user's prompt files
        lines = [json.dumps({"text": t}) for t in prompts(words)]
        (proj / "data" / "sources" / f"{name}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    params = yaml.safe_load((proj / "params.yaml").read_text(encoding="utf-8"))
    for section, values in SHRINK.items():
        params[section].update(values)
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False, allow_unicode=True), encoding="utf-8")
    logs = []
    for cmd in readme_commands():
        p = subprocess.run(["bash", "-c", cmd], cwd=proj, env={**ENV, "HOME": str(home)}, text=True,
                           capture_output=True, timeout=1500)
        logs.append(p.stdout + p.stderr)
        assert p.returncode == 0, f"README command failed: {cmd}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return proj, logs


def test_the_readme_commands_find_the_planted_layer_and_the_behaviour(ran):
    proj, logs = ran
    head = json.loads((proj / "report" / "headline.json").read_text())
    assert list(head) == ["mine"]
    mine = head["mine"]
    assert mine["entry_layer"] == PLANTED_LAYER
    assert mine["behaviour_measure"] == "target_rate"
    assert mine["behaviour_delta_lo"] > 0 and mine["behaviour_delta_hi"] >= mine["behaviour_delta"] > 0.5
    report = (proj / "report" / "report.md").read_text(encoding="utf-8")
    assert "mine (custom)" in report and "target behaviour rate" in report
    card = json.loads((proj / "report" / "verdict.json").read_text())["mine"]
    assert card["domain"] == "custom" and card["label"]
    steer = json.loads((proj / "artifacts" / "results" / "mine" / "steer.json").read_text())
    assert steer["task"] == "target"


def test_dvc_repro_trained_no_organism(ran):
    proj, logs = ran
    assert not any((proj / "artifacts" / "models" / name).exists() for name in ("base", "cultural", "cognitive"))
    assert yaml.safe_load((proj / "params.yaml").read_text())["organisms"]["build"] is False
    assert "mine: " in logs[-1] and "target match on ['target_prompts']" in logs[-1]  # pair list
