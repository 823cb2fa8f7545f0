"""Vocabularies: words (questions + captions), answers (top-K), action labels.

Built from the training split only, saved as one JSON file next to the run
(`Vocabularies.build(train_split, config).save(workdir/"vocab.json")`) and reloaded for
evaluation, so ids never depend on which split is evaluated.
Word ids: pad=0, unk=1, bos=2, eos=3, then words by decreasing count (ties alphabetical).
"""
from __future__ import annotations

import collections
import dataclasses
import json
import re

import numpy as np

PAD, UNK, BOS, EOS = 0, 1, 2, 3
SPECIALS = ("<pad>", "<unk>", "<bos>", "<eos>")
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
_ARTICLES = {"a", "an", "the"}


def tokenize(text: str) -> list[str]:
  """Lowercased words and numbers; punctuation dropped ("What's up?" -> ["what's", "up"])."""
  return _WORD.findall(text.lower())


def normalize_answer(text: str) -> str:
  """The QA matching form: lowercase, no punctuation, no articles, single spaces."""
  return " ".join(w for w in tokenize(text) if w not in _ARTICLES)


@dataclasses.dataclass
class Vocabularies:
  """Word, answer and action-label vocabularies of one training split."""
  words: list[str]  # Index = word id; starts with SPECIALS.
  answers: list[str]  # Index = answer class; normalised answers.
  actions: list[str]  # Sorted action labels; index = action class.
  domains: list[str]

  def __post_init__(self):
    self._word_id = {w: i for i, w in enumerate(self.words)}
    self._answer_id = {a: i for i, a in enumerate(self.answers)}
    self._action_id = {a: i for i, a in enumerate(self.actions)}

  @classmethod
  def build(cls, split, config) -> "Vocabularies":
    """From a training `SplitData`: words with count >= config.data.min_word_count, the
    config.data.answer_vocab_size most frequent normalised answers, every action label."""
    words, answers, actions = collections.Counter(), collections.Counter(), set()
    for e in split.entries:
      for q, a in e.qa_pairs or ():
        words.update(tokenize(q))
        answers[normalize_answer(a)] += 1
      for c in e.captions or ():
        words.update(tokenize(c))
      actions.update(label for _, _, label in e.actions or ())
    kept = sorted((w for w, n in words.items() if n >= config.data.min_word_count),
                  key=lambda w: (-words[w], w))
    top = sorted(answers, key=lambda a: (-answers[a], a))[:config.data.answer_vocab_size]
    return cls(list(SPECIALS) + kept, top, sorted(actions), list(config.data.domains))

  def save(self, path: str) -> None:
    with open(path, "w") as f:
      json.dump(dict(words=self.words, answers=self.answers, actions=self.actions,
                     domains=self.domains), f, indent=1)

  @classmethod
  def load(cls, path: str) -> "Vocabularies":
    try:
      with open(path) as f:
        d = json.load(f)
      return cls(d["words"], d["answers"], d["actions"], d["domains"])
    except (OSError, json.JSONDecodeError, KeyError) as e:
      raise ValueError(f"Cannot read vocabularies from {path}: {e}.") from None

  @property
  def num_words(self) -> int:
    return len(self.words)

  @property
  def num_answers(self) -> int:
    return len(self.answers)

  @property
  def num_actions(self) -> int:
    return len(self.actions)

  def encode(self, text: str, length: int, *, bos_eos: bool = False) -> np.ndarray:
    """(length,) int32 word ids, truncated (eos kept last) and padded with PAD."""
    ids = [self._word_id.get(w, UNK) for w in tokenize(text)]
    if bos_eos:
      ids = [BOS] + ids[:max(length - 2, 0)] + [EOS]
    out = np.zeros(length, np.int32)
    ids = ids[:length]
    out[:len(ids)] = ids
    return out

  def decode(self, ids) -> str:
    """Words up to the first EOS (BOS and PAD skipped)."""
    out = []
    for i in np.asarray(ids).tolist():
      if i == EOS:
        break
      if i in (PAD, BOS):
        continue
      out.append(self.words[i] if 0 <= i < len(self.words) else SPECIALS[UNK])
    return " ".join(out)

  def answer_id(self, answer: str) -> int:
    """Answer class, or -1 if the answer is not in the vocabulary."""
    return self._answer_id.get(normalize_answer(answer), -1)

  def action_id(self, label: str) -> int:
    """Action class, or -1 for a label unseen in training."""
    return self._action_id.get(label, -1)

  def domain_id(self, domain: str) -> int:
    return self.domains.index(domain) if domain in self.domains else (
        self.domains.index("general") if "general" in self.domains else 0)
