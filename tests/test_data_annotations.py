"""Annotation loading: every bad input gives one sentence naming file, entry and field."""
import json
import os
import shutil

import pytest

from data_testutil import dataset_dir, tiny_config, tmp_dir
from hvlm_jax.data import annotations
from hvlm_jax.data.annotations import AnnotationError, load_split


def make_data(actions=None, qa=None, captions=None, videos=("a", "b")):
  """A DATA dir whose training split has the given annotation lists and copies of real mp4s."""
  root = tmp_dir("ann")
  src = os.path.join(dataset_dir(), "training", "videos")
  split = os.path.join(root, "training")
  os.makedirs(os.path.join(split, "videos"))
  os.makedirs(os.path.join(split, "annotations"))
  for i, v in enumerate(videos):
    shutil.copy(os.path.join(src, sorted(os.listdir(src))[i]),
                os.path.join(split, "videos", v + ".mp4"))
  for name, rows in (("action_detection", actions), ("video_qa", qa),
                     ("video_captioning", captions)):
    if rows is not None:
      with open(os.path.join(split, "annotations", name + ".json"), "w") as f:
        f.write(rows if isinstance(rows, str) else json.dumps(rows))
  config = tiny_config(root)
  config.data.name = "folder"
  return config


def good_actions():
  return [dict(video_id="a", duration=2.0, actions=[dict(start=0.5, end=1.5, label="grow")]),
          dict(video_id="b", actions=[dict(start_time=0.0, end_time=1.0, category="appear")])]


def test_valid_split_joins_tasks_aliases_and_probes_durations():
  config = make_data(
      good_actions(), qa=[dict(video_id="b", domain="news",
                               qa_pairs=[dict(question="how many?", answer=2)])],
      captions=[dict(video_id="a", captions=[dict(start=1.0, end=2.0, caption="second"),
                                            dict(start=0.0, end=1.0, caption="first")])])
  split = load_split(config, "training")
  a, b = split.entries
  assert (a.video_id, a.actions, a.captions, a.qa_pairs) == (
      "a", [(0.5, 1.5, "grow")], ["first", "second"], None)
  assert b.actions == [(0.0, 1.0, "appear")] and b.qa_pairs == [("how many?", "2")]
  assert b.domain == "news" and a.domain == "general"
  assert b.duration == pytest.approx(2.0)  # Probed from the mp4: 24 frames at 12 fps.


def entry(**actions_entry):
  e = dict(video_id="a", actions=[dict(start=0.0, end=1.0, label="x")])
  e.update(actions_entry)
  return [e]


@pytest.mark.parametrize("rows, fragment", [
    ("[{", "action_detection.json: not valid JSON"),
    ('{"video_id": "a"}', "expected a JSON list of entries, got dict"),
    ([5], "entry 0 is a int, not an object"),
    ([dict(actions=[])], "entry 0, field 'video_id': expected a non-empty string"),
    (entry(video_id="../../etc/passwd"), "field 'video_id': '../../etc/passwd' escapes"),
    (entry(video_file="../b.mp4"), "field 'video_file': '../b.mp4' escapes"),
    (entry(actions=[dict(start=1.0, end=1.0, label="x")]),
     r"field 'actions\[0\].end': end 1.0 is not after start 1.0"),
    (entry(actions=[dict(start=-1.0, end=1.0, label="x")]),
     r"field 'actions\[0\].start': negative time -1.0"),
    (entry(actions=[dict(start="0", end=1.0, label="x")]),
     r"field 'actions\[0\].start': expected a finite number, got '0'"),
    (entry(actions=[dict(start=0.0, end=1.0)]), r"field 'actions\[0\].label': missing"),
    (entry(actions=None), "field 'actions': expected a list"),
    (entry(duration=-3), "field 'duration': must be positive"),
    (entry(domain="cooking"), "field 'domain': 'cooking' is not one of config.data.domains"),
    (entry() + entry(), "entry 1, field 'video_id': 'a' appears twice"),
    (entry(duration=2.0, actions=[dict(start=0.0, end=3.0, label="x")]),
     r"'actions\[0\].end': 3.0 s is past the video's duration 2.000 s"),
])
def test_bad_action_annotations_name_file_entry_and_field(rows, fragment):
  config = make_data(rows)
  with pytest.raises(AnnotationError, match=fragment) as err:
    load_split(config, "training")
  assert "action_detection.json" in str(err.value) and "\n" not in str(err.value)


def test_times_past_the_probed_duration_are_an_error():
  config = make_data(entry(actions=[dict(start=0.0, end=5.0, label="x")]))
  with pytest.raises(AnnotationError, match=r"5.0 s is past the video's duration 2.000 s"):
    load_split(config, "training")


@pytest.mark.parametrize("rows, fragment", [
    ([dict(video_id="a", qa_pairs=[dict(question="q?")])],
     r"video_qa.json: entry 0, field 'qa_pairs\[0\].answer'"),
    ([dict(video_id="a", qa_pairs="q")], "field 'qa_pairs': expected a list"),
])
def test_bad_qa_annotations(rows, fragment):
  with pytest.raises(AnnotationError, match=fragment):
    load_split(make_data(qa=rows), "training")


def test_conflicting_domains_between_files_are_an_error():
  config = make_data(entry(domain="news"), captions=[dict(video_id="a", domain="sports",
                                                         captions=["x"])])
  with pytest.raises(AnnotationError, match="field 'domain': 'sports' contradicts 'news'"):
    load_split(config, "training")


def test_unmatched_videos_and_annotations_are_skipped_and_counted_or_strict_errors():
  rows = good_actions()[:1] + [dict(video_id="ghost", actions=[])]
  config = make_data(rows, videos=("a", "b"))
  split = load_split(config, "training")
  assert split.video_ids == ["a"]
  assert split.skipped["no_video"] == ["ghost"] and split.skipped["no_annotations"] == ["b"]
  config.data.strict = True
  with pytest.raises(AnnotationError, match="1 annotated videos have no file in .*'ghost'"):
    load_split(config, "training")


def test_missing_directories_and_files_name_the_path():
  config = make_data(good_actions())
  with pytest.raises(FileNotFoundError, match="Split directory .*/validation does not exist"):
    load_split(config, "validation")
  os.remove(os.path.join(config.data.dir, "training", "annotations", "action_detection.json"))
  with pytest.raises(FileNotFoundError, match="No annotation files in .*annotations"):
    load_split(config, "training")
  config.data.dir = "/nonexistent/data"
  with pytest.raises(FileNotFoundError, match="Data directory /nonexistent/data does not"):
    load_split(config, "training")


def test_corrupt_video_is_skipped_in_training_and_an_error_in_evaluation():
  config = make_data([dict(video_id="a", actions=[]), dict(video_id="b", actions=[])])
  with open(os.path.join(config.data.dir, "training", "videos", "b.mp4"), "wb") as f:
    f.write(b"not a video")
  split = load_split(config, "training")
  assert split.video_ids == ["a"] and split.skipped["corrupt"] == ["b"]
  with pytest.raises(Exception, match="b.mp4"):
    load_split(config, "training", training=False)
  config.data.max_corrupt_videos = 0
  with pytest.raises(Exception, match="exceed config.data.max_corrupt_videos=0"):
    load_split(config, "training")


def test_activitynet_ground_truth_converts_and_loads():
  config = make_data(None, captions=[dict(video_id="a", captions=["x"])])
  gt = {"database": {
      "a": {"duration": 2.0, "subset": "training",
            "annotations": [{"segment": [0.2, 2.3], "label": "Long jump"}]},
      "v2": {"duration": 9.0, "subset": "testing", "annotations": []}}}
  path = os.path.join(config.data.dir, "gt.json")
  with open(path, "w") as f:
    json.dump(gt, f)
  counts = annotations.convert_activitynet(path, config.data.dir)
  assert counts == {"training": 1, "test": 1}
  split = load_split(config, "training")
  assert split.entries[0].actions == [(0.2, 2.0, "Long jump")]  # Clipped to the duration.
  gt["database"]["a"]["subset"] = "dev"
  with open(path, "w") as f:
    json.dump(gt, f)
  with pytest.raises(AnnotationError, match="gt.json: entry 0, field 'subset'"):
    annotations.convert_activitynet(path, config.data.dir, overwrite=True)
