"""Study configs in experiments/: every variant loads, validates and changes only what it says.

Cheap: no training, no compilation. The runner's table and event-file reader are checked on
hand-made inputs.
"""
import glob
import os
import types

import numpy as np
import pytest

from hvlm_jax import config as config_lib
from hvlm_jax import run as run_lib
from hvlm_jax.config import ConfigError, import_sibling
from hvlm_jax.data.pipeline import domain_weights
from hvlm_jax.models import model as model_lib
from hvlm_jax.models.token_merging import MergingSpec, merge_schedule
from hvlm_jax.train import state as state_lib

_EXPERIMENTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "experiments")
common = import_sibling(os.path.join(_EXPERIMENTS, "common.py"), "common.py")
run = import_sibling(os.path.join(_EXPERIMENTS, "run.py"), "run.py")


def _studies():
  out = {}
  for path in sorted(glob.glob(os.path.join(_EXPERIMENTS, "*.py"))):
    if os.path.basename(path) in ("common.py", "run.py", "__init__.py"):
      continue
    module = import_sibling(path, os.path.basename(path))
    if hasattr(module, "VARIANTS"):
      out[os.path.splitext(os.path.basename(path))[0]] = module
  return out


STUDIES = _studies()
CASES = [(s, v) for s, m in STUDIES.items() for v in m.VARIANTS]


def _flat(d, prefix=""):
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = tuple(v) if isinstance(v, list) else v
  return out


def test_the_five_studies_of_the_issue_exist():
  assert {"attention_ablation", "merging_sweep", "merging_importance", "lora_new_domain",
          "experts"} <= set(STUDIES)


@pytest.mark.parametrize("study,variant", CASES)
def test_every_variant_loads_and_validates(study, variant):
  config = STUDIES[study].get_config(f"variant={variant}")
  run_lib.validate(config, 8)
  model_lib.check_model_config(config.model)
  state_lib.finetune_mode(config)
  spec = MergingSpec.from_config(config.model.token_merging)
  if spec is not None:  # The token budget must be feasible for every block.
    t, p, _ = config.model.tubelet_size
    n = config.data.video.num_frames // t * (config.data.video.frame_size // p) ** 2
    merge_schedule(n, config.model.num_layers, spec.target_compression_ratio, spec.schedule,
                   spec.protect_fraction)
  split = types.SimpleNamespace(root="fake", entries=[types.SimpleNamespace(domain=d)
                                                      for d in config.data.domains])
  domain_weights(config, split)  # Raises on a domain_balancing spec naming no domain.


@pytest.mark.parametrize("study,variant", CASES)
def test_variant_changes_only_its_declared_keys(study, variant):
  overrides = STUDIES[study].VARIANTS[variant]
  reference = _flat(common.study_config("", {"reference": {}}).to_dict())
  changed = _flat(STUDIES[study].get_config(f"variant={variant}").to_dict())
  assert set(changed) == set(reference)
  differing = {k for k in reference if changed[k] != reference[k]}
  # A study may rescale the budget of some variants (BUDGET_KEYS), nothing else.
  budget = set(getattr(STUDIES[study], "BUDGET_KEYS", ())) if variant in getattr(
      STUDIES[study], "HALF_BUDGET", ()) else set()
  # Or set keys for all its variants alike (STUDY_OVERRIDES, e.g. another dataset).
  shared = getattr(STUDIES[study], "STUDY_OVERRIDES", {})
  assert differing <= set(overrides) | budget | set(shared)
  for k, v in {**shared, **overrides}.items():
    assert changed[k] == v, k


def test_pretraining_study_splits_the_budget_in_halves():
  study = STUDIES["pretraining"]
  steps = {v: study.get_config(f"variant={v},steps=100").training.num_steps
           for v in study.VARIANTS}
  assert steps == dict(scratch=100, pretrain=50, finetune=50)
  assert study.get_config("variant=pretrain").training.objective == "masked_video"


def test_budget_arguments_reach_the_config():
  config = STUDIES["attention_ablation"].get_config("variant=mamba,steps=37,layers=3,"
                                                    "batch_size=8")
  assert config.training.num_steps == 37 and config.model.num_layers == 3
  assert config.data.batch_size == config.data.eval_batch_size == 8
  assert config.model.attention.type == "mamba"
  assert config.training.eval_every_steps == 0
  assert config.training.checkpoint_every_steps == 37


def test_lora_study_pretrains_without_the_new_domain_and_finetunes_on_it_alone():
  study = STUDIES["lora_new_domain"]
  domains = ["sports", "tutorials", "news", "general", "general", "news"]
  split = types.SimpleNamespace(root="fake", entries=[types.SimpleNamespace(domain=d)
                                                      for d in domains])
  is_new = np.array([d == study.NEW_DOMAIN for d in domains])
  pre = domain_weights(study.get_config("variant=pretrain"), split)
  assert pre[is_new].sum() == 0 and np.isclose(pre.sum(), 1)
  # Each old domain equally likely: 1/3, split among its examples.
  np.testing.assert_allclose(pre[~is_new], [1 / 3, 1 / 3, 1 / 6, 1 / 6])
  for name, parent in study.INIT_FROM.items():
    assert list(study.VARIANTS).index(parent) < list(study.VARIANTS).index(name)
    fine = domain_weights(study.get_config(f"variant={name}"), split)
    np.testing.assert_allclose(fine, np.where(is_new, 0.5, 0.0))
  assert study.get_config("variant=finetune_lora").training.finetune == "lora"


def test_unknown_variant_and_key_fail_naming_them():
  with pytest.raises(ConfigError, match="'nope'.*full"):
    STUDIES["attention_ablation"].get_config("variant=nope")
  with pytest.raises(ConfigError, match="model.attention.typo"):
    config_lib.apply_overrides(STUDIES["attention_ablation"].get_config(),
                           {"model.attention.typo": 1})


def test_event_reader_returns_the_written_scalars(tmp_path):
  from tensorboardX import SummaryWriter
  w = SummaryWriter(str(tmp_path))
  for step, v in ((20, 3.5), (40, 2.25)):
    w.add_scalar("train/loss", v, step)
  w.close()
  assert run.read_scalars(str(tmp_path))["train/loss"] == [(20, 3.5), (40, 2.25)]


def test_results_table_states_the_budget_and_keeps_failed_rows():
  meta = dict(study="s", description="d", budget=dict(steps=150, layers=2, batch_size=16,
                                                      split="test"),
              width=128, heads=4, mlp=256, frames=16, frame_size=64, learning_rate=1e-3,
              seed=0, dataset="synthetic", commit="abc", device="cpu", command="c")
  ok = dict(variant="a", changes="type=full", status="ok", trainable="10", train_loss=1.0,
            test_loss=2.0, train_clips_per_s=3.0, train_minutes=4.0, qa_accuracy=0.5,
            qa_majority_baseline=0.25)
  text = run.markdown(meta, [ok, dict(variant="b", changes="x", status="failed: boom")], False)
  assert "150 training steps per variant, 2 encoder block(s)" in text
  assert "| a | type=full | 10 | 1.000 | 2.000 | - | - | 0.500 |" in text
  assert "| b | x | failed: boom |" in text
  assert "baseline: 0.250" in text


def test_seed_table_reports_mean_std_and_differences_beyond_two_standard_errors():
  meta = dict(study="s", description="d", budget=dict(steps=150, layers=2, batch_size=16,
                                                      split="test"),
              width=128, heads=4, mlp=256, frames=16, frame_size=64, learning_rate=1e-3,
              seed=0, dataset="synthetic", commit="abc", device="cpu", command="c")

  def row(variant, seed, qa, top1):
    return dict(variant=variant, seed=seed, changes=variant, status="ok", trainable="1",
                train_loss=1.0, test_loss=2.0, qa_accuracy=qa, classification_top1=top1)
  rows = [row("a", 0, 0.50, 0.30), row("a", 1, 0.52, 0.40), row("a", 2, 0.54, 0.50),
          row("b", 0, 0.70, 0.35), row("b", 1, 0.72, 0.45), row("b", 2, 0.74, 0.55)]
  groups = run.aggregate(rows)
  assert [g["n"] for g in groups] == [3, 3]
  np.testing.assert_allclose(groups[0]["qa_accuracy"], (0.52, 0.02))  # Sample std, ddof 1.
  diffs = run.significant_differences(groups)
  # QA: +0.20 against 2 SE = 2 sqrt(2 * 0.02^2 / 3) = 0.0327 -> reported; top-1: +0.05
  # against 2 sqrt(2 * 0.1^2 / 3) = 0.163 -> within noise.
  assert len(diffs) == 1 and diffs[0].startswith("b vs a: QA acc +0.200 (2 SE = 0.033)")
  text = run.markdown(meta, rows, False)
  assert "| a | a | 3 | 1.000 ± 0.000 | 2.000 ± 0.000 |" in text
  assert "0.520 ± 0.020" in text and "b vs a: QA acc +0.200" in text


def test_seed_table_has_a_per_domain_table_and_tests_its_differences():
  meta = dict(study="s", description="d", budget=dict(steps=150, layers=2, batch_size=16,
                                                      split="test"),
              width=128, heads=4, mlp=256, frames=16, frame_size=64, learning_rate=1e-3,
              seed=0, dataset="synthetic", commit="abc", device="cpu", command="c")

  def row(variant, seed, new_map):
    return {"variant": variant, "seed": seed, "changes": variant, "status": "ok",
            "trainable": "1", "train_loss": 1.0, "test_loss": 2.0, "qa_accuracy": 0.5,
            "general/action_mAP_0.5": new_map, "sports/action_mAP_0.5": 0.3}
  rows = [row("a", s, m) for s, m in enumerate((0.30, 0.32, 0.34))] + [
      row("b", s, m) for s, m in enumerate((0.50, 0.52, 0.54))]
  text = run.markdown(meta, rows, True)
  assert "| variant | general mAP@0.5 | general QA acc | general CIDEr | sports mAP@0.5 |" in text
  assert "| b | 0.520 ± 0.020 | - | - | 0.300 ± 0.000 |" in text
  assert "b vs a: general mAP@0.5 +0.200" in text
  assert "sports mAP@0.5" not in text.split("larger than two standard errors")[1]
  # Without PER_DOMAIN the seed table stays as it was.
  assert "general mAP@0.5" not in run.markdown(meta, rows, False)
