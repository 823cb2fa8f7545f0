"""Metrics against hand-computed values and a naive loop implementation of each protocol."""
import numpy as np
import pytest

from hvlm_jax.eval import metrics as M


def seg(video, start, end, label, score=None):
  d = {"video_id": video, "start": start, "end": end, "label": label}
  if score is not None:
    d["score"] = score
  return d


# --------------------------------------------------------------------------- detection mAP

def naive_ap(predictions, ground_truth, label, thr):
  """ActivityNet AP of one class at one threshold, written as plainly as possible."""
  gts = [g for g in ground_truth if g["label"] == label]
  preds = sorted((p for p in predictions if p["label"] == label), key=lambda p: -p["score"])
  used, hits = set(), []
  for p in preds:
    best, best_iou = None, -1.0
    for j, g in enumerate(gts):
      if g["video_id"] != p["video_id"] or j in used:
        continue
      inter = max(0.0, min(p["end"], g["end"]) - max(p["start"], g["start"]))
      iou = inter / ((p["end"] - p["start"]) + (g["end"] - g["start"]) - inter)
      if iou >= thr and iou > best_iou:
        best, best_iou = j, iou
    hits.append(best is not None)
    if best is not None:
      used.add(best)
  prec = [sum(hits[:i + 1]) / (i + 1) for i in range(len(hits))]
  rec = [sum(hits[:i + 1]) / len(gts) for i in range(len(hits))]
  ap, last_recall = 0.0, 0.0
  for i in range(len(hits)):
    if rec[i] > last_recall:  # area of the step up to rec[i] under the precision envelope
      ap += (rec[i] - last_recall) * max(prec[i:])
      last_recall = rec[i]
  return ap


def test_perfect_predictions_give_map_one():
  gt = [seg("a", 0, 5, "run"), seg("a", 7, 9, "jump"), seg("b", 1, 30, "run")]
  preds = [dict(g, score=0.5) for g in gt]
  result = M.detection_map(preds, gt)
  assert set(result) == {f"mAP@{t:.2f}" for t in M.ACTIVITYNET_TIOU} | {"mAP"}
  assert all(v == 1.0 for v in result.values())


def test_missed_class_lowers_mean_by_its_share():
  gt = [seg("a", 0, 5, c) for c in "wxyz"]
  preds = [seg("a", 0, 5, c, 0.9) for c in "wxy"]  # class z never predicted: AP 0
  result = M.detection_map(preds, gt)
  assert all(v == pytest.approx(0.75) for v in result.values())


def test_duplicates_are_false_positives():
  gt = [seg("a", 0, 10, "x"), seg("b", 0, 10, "x")]
  preds = [seg("a", 0, 10, "x", 0.9), seg("a", 0, 10, "x", 0.8), seg("b", 0, 10, "x", 0.7)]
  # ranked hits: TP, FP (duplicate), TP -> precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1.
  assert M.detection_map(preds, gt)["mAP"] == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
  assert M.detection_map([preds[0], preds[2]], gt)["mAP"] == 1.0


def test_low_tiou_hit_counts_only_at_low_thresholds():
  gt = [seg("a", 0, 10, "x")]
  result = M.detection_map([seg("a", 0, 6.2, "x", 1.0)], gt)  # tIoU 0.62
  for t in M.ACTIVITYNET_TIOU:
    assert result[f"mAP@{t:.2f}"] == (1.0 if t <= 0.62 else 0.0)
  assert result["mAP"] == pytest.approx(3 / 10)
  thumos = M.detection_map([seg("a", 0, 6.2, "x", 1.0)], gt, M.THUMOS_TIOU)
  assert thumos == pytest.approx({"mAP@0.30": 1, "mAP@0.40": 1, "mAP@0.50": 1, "mAP@0.60": 1,
                                  "mAP@0.70": 0, "mAP": 0.8})


def test_tiou_equal_to_threshold_is_a_hit():
  result = M.detection_map([seg("a", 0, 5, "x", 1.0)], [seg("a", 0, 10, "x")])  # tIoU 0.5
  assert result["mAP@0.50"] == 1.0 and result["mAP@0.55"] == 0.0


def test_labels_absent_from_ground_truth_are_ignored():
  gt = [seg("a", 0, 5, "x")]
  preds = [seg("a", 0, 5, "x", 0.5), seg("a", 0, 5, "ghost", 0.99), seg("b", 3, 4, "ghost", 0.9)]
  assert M.detection_map(preds, gt)["mAP"] == 1.0
  assert M.detection_ap(preds, gt).num_ignored == 2


def test_prediction_in_video_without_ground_truth_is_false_positive():
  gt = [seg("a", 0, 5, "x")]
  preds = [seg("elsewhere", 0, 5, "x", 0.9), seg("a", 0, 5, "x", 0.5)]
  assert M.detection_map(preds, gt)["mAP"] == pytest.approx(0.5)  # precision 1/2 at recall 1


def test_hand_computed_interpolated_ap():
  gt = [seg("a", 0, 10, "x"), seg("a", 20, 30, "x"), seg("b", 0, 4, "x")]
  preds = [seg("a", 0, 9, "x", 0.9),     # TP (tIoU 0.9)
           seg("b", 10, 20, "x", 0.8),   # FP (no overlap)
           seg("a", 21, 30, "x", 0.7),   # TP (tIoU 0.9)
           seg("a", 1, 9, "x", 0.6)]     # FP: its only match is taken
  # precision 1, 1/2, 2/3, 1/2 at recall 1/3, 1/3, 2/3, 2/3; the envelope is 1 up to recall
  # 1/3, 2/3 up to 2/3, then 0 to recall 1.
  expected = 1 / 3 * 1 + 1 / 3 * 2 / 3 + 1 / 3 * 0
  result = M.detection_ap(preds, gt, [0.5])
  assert result.ap[0, 0] == pytest.approx(expected)
  assert M.interpolated_average_precision(np.array([1, .5, 2 / 3, .5]),
                                          np.array([1, 1, 2, 2]) / 3) == pytest.approx(expected)


def test_matching_falls_back_to_next_best_unmatched_segment():
  gt = [seg("a", 0, 10, "x"), seg("a", 2, 12, "x")]
  preds = [seg("a", 0, 9, "x", 0.9),    # tIoU 0.9 with the first, 7/12 with the second
           seg("a", 0, 10, "x", 0.8)]   # first taken; second at tIoU 8/12 = 0.667
  result = M.detection_ap(preds, gt, [0.5, 0.65, 0.7])
  np.testing.assert_allclose(result.ap[0], [1.0, 1.0, 0.5])


def test_matches_naive_reference_on_random_cases():
  rng = np.random.default_rng(0)
  for trial in range(5):
    gt, preds = [], []
    for v in range(4):
      for _ in range(rng.integers(1, 5)):
        s = rng.uniform(0, 50)
        gt.append(seg(f"v{v}", s, s + rng.uniform(1, 20), f"c{rng.integers(3)}"))
    for _ in range(40):
      g = gt[rng.integers(len(gt))]
      jitter = rng.normal(0, 3, 2)
      s, e = g["start"] + jitter[0], g["end"] + jitter[1]
      if e <= s:
        e = s + 0.5
      video = g["video_id"] if rng.random() < 0.9 else "v4"
      preds.append(seg(video, s, e, f"c{rng.integers(3)}", rng.random()))
    result = M.detection_ap(preds, gt)
    for c, label in enumerate(result.classes):
      for k, t in enumerate(result.thresholds):
        assert result.ap[c, k] == pytest.approx(naive_ap(preds, gt, label, t), abs=1e-12), (
            trial, label, t)


def test_detection_input_errors_name_the_entry():
  gt = [seg("a", 0, 5, "x")]
  with pytest.raises(ValueError, match="prediction 1 has end <= start"):
    M.detection_map([seg("a", 0, 5, "x", 1.0), seg("a", 5, 5, "x", 1.0)], gt)
  with pytest.raises(ValueError, match="prediction 0 lacks the key.*score"):
    M.detection_map([seg("a", 0, 5, "x")], gt)
  with pytest.raises(ValueError, match="ground-truth segment 0 has a non-finite"):
    M.detection_map([], [seg("a", 0, float("nan"), "x")])
  with pytest.raises(ValueError, match="tiou_thresholds"):
    M.detection_map([], gt, [0.0, 0.5])
  with pytest.raises(M.EmptyEvaluationError):
    M.detection_map([seg("a", 0, 5, "x", 1.0)], [])


# --------------------------------------------------------------------------- captions

REFS = {"v1": ["A man rides a horse on the beach."],
        "v2": ["Two dogs play with a red ball"],
        "v3": ["a woman cooks pasta in a small kitchen"]}


def test_identical_captions_score_perfectly():
  preds = {k: v[0].upper() + "!" for k, v in REFS.items()}  # tokenisation removes the difference
  s = M.caption_scores(REFS, preds, meteor=False)
  for n in range(1, 5):
    assert s[f"BLEU-{n}"] == pytest.approx(1.0, abs=1e-6)
  assert s["ROUGE_L"] == pytest.approx(1.0)
  # Every caption has n-grams of each order that no other video has, so each cosine term is 1:
  # CIDEr-D = 10 * mean_n 1.
  assert s["CIDEr"] == pytest.approx(10.0)
  assert "METEOR" not in s


def test_disjoint_captions_score_zero():
  preds = {"v1": "zebra", "v2": "quantum flux capacitor now", "v3": ""}
  s = M.caption_scores(REFS, preds, meteor=False)
  for key in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE_L", "CIDEr"):
    assert s[key] == pytest.approx(0.0, abs=1e-9), key


def test_bleu1_and_rouge_l_hand_computed():
  refs = {"v": ["a b x y"]}
  s = M.caption_scores(refs, {"v": "a b c d"}, meteor=False)
  assert s["BLEU-1"] == pytest.approx(2 / 4)  # clipped unigram precision, no brevity penalty
  s = M.caption_scores({"v": ["a x c d"]}, {"v": "a b c d"}, meteor=False)
  assert s["ROUGE_L"] == pytest.approx(0.75)  # LCS 3 of 4: P = R = F = 0.75


def test_cider_is_zero_on_a_one_video_set():
  # Every n-gram occurs in the only reference set, so its idf log(1 / 1) is 0.
  s = M.caption_scores({"v1": REFS["v1"]}, {"v1": REFS["v1"][0]}, meteor=False)
  assert s["CIDEr"] == 0.0 and s["ROUGE_L"] == 1.0


def test_caption_input_errors_and_extra_predictions():
  with pytest.raises(ValueError, match="video 'v2' has reference captions but no predicted"):
    M.caption_scores(REFS, {"v1": "x", "v3": "y"}, meteor=False)
  preds = {k: v[0] for k, v in REFS.items()} | {"unreferenced": "anything"}
  assert M.caption_scores(REFS, preds, meteor=False)["ROUGE_L"] == pytest.approx(1.0)


def test_tokenize_caption():
  assert M.tokenize_caption("  A man's  HORSE-riding, (fast)!") == "a mans horse riding fast"


def test_meteor_skipped_with_note_without_java(monkeypatch):
  monkeypatch.setattr(M.shutil, "which", lambda name: None)
  s = M.caption_scores(REFS, {k: v[0] for k, v in REFS.items()})
  assert "METEOR" not in s and any("java" in n for n in s["notes"])


@pytest.mark.skipif(M.shutil.which("java") is None, reason="java not found")
def test_meteor_identical_and_disjoint():
  same = M.caption_scores(REFS, {k: v[0] for k, v in REFS.items()}, meteor=True)
  assert same["METEOR"] == pytest.approx(1.0)
  none = M.caption_scores(REFS, {"v1": "zebra", "v2": "quantum", "v3": "flux"}, meteor=True)
  assert none["METEOR"] == 0.0


# --------------------------------------------------------------------------- QA

@pytest.mark.parametrize("raw, normalized", [
    ("The Red Car.", "red car"), ("an apple", "apple"), ("  A  b  ", "b"), ("Don't!", "dont"),
    ("theater", "theater"), ("A, the; an", ""), ("Two  Dogs", "two dogs")])
def test_normalize_answer(raw, normalized):
  assert M.normalize_answer(raw) == normalized


def test_qa_accuracy_overall_and_per_type():
  preds = ["The cat", "dog", "two", "Yes."]
  answers = ["cat", "a dog.", "2", ["yes", "yeah"]]
  types = ["what", "what", "count", "yesno"]
  r = M.qa_accuracy(preds, answers, types)
  assert r["accuracy"] == 0.75 and r["num_questions"] == 4
  assert r["per_type"] == {"count": {"accuracy": 0.0, "num_questions": 1},
                           "what": {"accuracy": 1.0, "num_questions": 2},
                           "yesno": {"accuracy": 1.0, "num_questions": 1}}
  with pytest.raises(ValueError, match="3 predictions for 4 answers"):
    M.qa_accuracy(preds[:3], answers)


def test_qa_majority_baseline():
  r = M.qa_majority_baseline(["yes", "no", "No.", "no"], train_answers=["Yes", "yes", "no"])
  assert r == {"answer": "yes", "accuracy": 0.25, "num_questions": 4}
  assert M.qa_majority_baseline(["yes", "no", "No.", "no"])["accuracy"] == 0.75


# --------------------------------------------------------------------------- top-k

def test_topk_hand_computed_with_ties():
  logits = [[0.1, 0.5, 0.2], [0.9, 0.05, 0.05], [0.0, 0.0, 0.0]]
  # ranks of the labels: 1; 1 (class 2 ties but comes later); 2 (two earlier ties)
  r = M.classification_topk(logits, [2, 1, 2], ks=(1, 2, 3))
  assert r == {"top1": 0.0, "top2": 2 / 3, "top3": 1.0, "num_examples": 3}
  r = M.classification_topk(logits, [2, 1, 2], ks=(2,), mask=[True, False, False])
  assert r == {"top2": 1.0, "num_examples": 1}


def test_topk_matches_argsort_reference():
  rng = np.random.default_rng(1)
  logits, labels = rng.normal(size=(200, 10)), rng.integers(0, 10, 200)
  top = np.argsort(-logits, axis=1)
  r = M.classification_topk(logits, labels)
  assert r["top1"] == np.mean(top[:, 0] == labels)
  assert r["top5"] == np.mean((top[:, :5] == labels[:, None]).any(1))


# --------------------------------------------------------------------------- per domain

def test_per_domain_slices_each_kind_of_input():
  domain_of = {"a": "sports", "b": "news", "c": "news"}
  gt = [seg("a", 0, 5, "x"), seg("b", 0, 5, "x"), seg("c", 0, 5, "y")]
  preds = [seg("a", 0, 5, "x", 0.9), seg("b", 0, 5, "x", 0.9),  # news misses class y
           seg("d", 0, 5, "x", 0.9)]  # video d has no domain entry and no ground truth
  det = M.per_domain(M.detection_map, domain_of, preds, gt)
  assert set(det) == {"sports", "news"}  # "general" (video d) has no ground truth: left out
  assert det["sports"]["mAP"] == 1.0 and det["news"]["mAP"] == 0.5

  qa = M.per_domain(M.qa_accuracy, domain_of, ["x", "y", "z"], ["x", "n", "z"], None,
                    item_videos=["a", "b", "c"])
  assert qa["sports"]["accuracy"] == 1.0 and qa["news"]["accuracy"] == 0.5

  refs = {"a": ["one two three four"], "b": ["five six seven eight"]}
  cap = M.per_domain(M.caption_scores, domain_of, refs,
                     {"a": "one two three four", "b": "nine", "c": "unused"}, meteor=False)
  assert set(cap) == {"sports", "news"}
  assert cap["sports"]["ROUGE_L"] == 1.0 and cap["news"]["ROUGE_L"] == 0.0

  logits = np.eye(3)
  top = M.per_domain(M.classification_topk, domain_of, logits, np.array([0, 1, 0]),
                     item_videos=["a", "b", "c"], ks=(1,))
  assert top["sports"]["top1"] == 1.0 and top["news"]["top1"] == 0.5
  with pytest.raises(ValueError, match="item_videos"):
    M.per_domain(M.qa_accuracy, domain_of, ["x"], ["x"])


# --------------------------------------------------------------------------- report files

from hvlm_jax.eval import report as R  # noqa: E402


def test_json_written_atomically_with_numpy_and_nan(tmp_path):
  path = tmp_path / "sub" / "metrics.json"
  R.write_json_atomic(path, {"a": np.float32(0.5), "b": np.arange(3), "c": float("nan"),
                             1: (np.int64(2), np.bool_(True))})
  import json
  assert json.loads(path.read_text()) == {"a": 0.5, "b": [0, 1, 2], "c": None, "1": [2, True]}
  assert oct(path.stat().st_mode & 0o777) == oct(0o644)


def test_failed_write_keeps_previous_file(tmp_path, monkeypatch):
  path = tmp_path / "metrics.json"
  R.write_json_atomic(path, {"mAP": 0.5})
  good = path.read_text()
  with pytest.raises(TypeError, match=r"metrics.json\['x'\]\[1\] is a object"):
    R.write_json_atomic(path, {"mAP": 0.9, "x": [1, object()]})
  def broken_replace(src, dst):
    raise OSError("disk full")
  monkeypatch.setattr(R.os, "replace", broken_replace)
  with pytest.raises(OSError, match="disk full"):
    R.write_json_atomic(path, {"mAP": 0.9})
  assert path.read_text() == good
  assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]  # no temp left behind


def test_markdown_report_tables_and_baseline(tmp_path):
  qa = M.qa_accuracy(["yes", "no", "two"], ["yes", "yes", "2"], ["yn", "yn", "count"])
  qa["majority_baseline"] = M.qa_majority_baseline(["yes", "yes", "2"])
  gt = [seg("a", 0, 5, "x"), seg("b", 0, 5, "y")]
  metrics = {
      "meta": {"split": "test", "step": 100},
      "detection": M.detection_map([dict(gt[0], score=0.9)], gt, M.THUMOS_TIOU),
      "qa": qa,
      "captioning": M.caption_scores(REFS, {k: v[0] for k, v in REFS.items()}, meteor=False),
      "classification": M.classification_topk([[1, 0], [0, 1]], [0, 0], ks=(1,)),
      "per_domain": {"news": {"qa": {"accuracy": 0.5, "majority_baseline": {"accuracy": 0.25}}},
                     "sports": {"detection": {"mAP": 1.0, "mAP@0.50": 1.0}}},
      "losses": {"total": 1.5, "qa": {"ce": 0.2}}}
  text = R.markdown_report(metrics, title="Evaluation: test")
  lines = text.splitlines()
  assert lines[0] == "# Evaluation: test"
  assert "| step | 100 |" in lines
  i = lines.index("| mAP | mAP@0.30 | mAP@0.40 | mAP@0.50 | mAP@0.60 | mAP@0.70 |")
  assert lines[i + 2] == "| 0.5000 | 0.5000 | 0.5000 | 0.5000 | 0.5000 | 0.5000 |"
  assert "Accuracy **0.3333** over 3 questions." in lines
  assert 'Majority-answer baseline (always "yes"): 0.6667.' in lines
  assert "| count | 0.0000 | 1 |" in lines and "| yn | 0.5000 | 2 |" in lines
  assert "| domain | det mAP@0.50 | det mAP | QA accuracy | QA majority |" in lines
  assert "| news | - | - | 0.5000 | 0.2500 |" in lines
  assert "| sports | 1.0000 | 1.0000 | - | - |" in lines
  i = lines.index("| BLEU-1 | BLEU-2 | BLEU-3 | BLEU-4 | ROUGE_L | CIDEr |")
  assert lines[i + 2] == "| 1.0000 | 1.0000 | 1.0000 | 1.0000 | 1.0000 | 10.0000 |"
  assert lines[i + 5] == "- METEOR not requested."
  assert "| top1 | num_examples |" in lines and "| 0.5000 | 2 |" in lines
  assert "| qa/ce | 0.2000 |" in lines
  paths = R.write_results(tmp_path, metrics, {"qa": ["yes"]}, name="test")
  assert open(paths["report"]).read() == text
  assert sorted(p.name for p in tmp_path.iterdir()) == [
      "metrics_test.json", "predictions_test.json", "report_test.md"]
