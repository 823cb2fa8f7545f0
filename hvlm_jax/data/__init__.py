"""Data: annotations, video decoding, vocabularies, the grain pipeline, synthetic videos.

    split = load_split(config, "training")          # validated SplitData
    vocabs = Vocabularies.build(split, config)      # .save(path) / Vocabularies.load(path)
    it = make_train_iterator(config, split, vocabs, seed=0)   # grain, get_state/set_state
    for batch in eval_batches(config, load_split(config, "validation"), vocabs): ...
"""
from hvlm_jax.data.annotations import AnnotationError, SplitData, VideoEntry, load_split
from hvlm_jax.data.pipeline import eval_batches, make_train_iterator, num_eval_batches
from hvlm_jax.data.synthetic import ensure_dataset
from hvlm_jax.data.text import Vocabularies
from hvlm_jax.data.video import VideoError

__all__ = ["AnnotationError", "SplitData", "VideoEntry", "VideoError", "Vocabularies",
           "ensure_dataset", "eval_batches", "load_split", "make_train_iterator",
           "num_eval_batches"]
