"""Data: annotations, video decoding, vocabularies, the grain pipeline, synthetic videos."""
