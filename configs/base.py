"""Base config: every key the framework reads, with defaults for a ViViT-B-sized model.

Run: python -m hvlm_jax.train --config=configs/base.py:attention=mamba --workdir=runs/x
Arguments after `:` (comma separated): see ARGS below. Any key can also be overridden with
`--config.a.b=value`; unknown keys and wrong types fail naming the key.
"""
import ml_collections

from hvlm_jax.config import parse_arg

ARGS = dict(attention="full", frames=32, frame_size=224, merging=False, runlocal=False)


def get_config(arg=None):
  args = parse_arg(arg, **ARGS)
  config = ml_collections.ConfigDict()
  config.seed = 0
  # Parameters to start from: another run ("WORKDIR" or "WORKDIR:STEP"; tensors whose path and
  # shape match) or a Hugging Face checkpoint directory ("hf:/path/to/dir").
  config.init_from = ""
  # Persistent compilation cache: "default" ($HVLM_COMPILATION_CACHE, else
  # ~/.cache/hvlm_jax/jax), a directory, or "off". A rerun then skips compilation.
  config.compilation_cache = "default"
  # Traced programs (jax.export) stored beside it, so a rerun also skips tracing the model
  # (hvlm_jax/trace_cache.py says what the key covers). Off with the compilation cache.
  config.trace_cache = True

  # ----- data ---------------------------------------------------------------------------
  config.data = data = ml_collections.ConfigDict()
  data.name = "folder"  # "folder": DATA layout of the README; "synthetic": generated on first use.
  data.dir = "data/videos"
  data.input = "video"  # "video" (mp4 decode), "cache" (ArrayRecord clips), "features" (.npy).
  data.cache_dir = ""  # Where tools/build_dataset.py wrote the ArrayRecord cache.
  data.features_dim = 0  # Width of precomputed features in features mode.
  data.batch_size = 8  # Global batch size, split over processes.
  data.eval_batch_size = 8
  data.num_workers = 0  # grain worker processes per host (0: decode in the main process).
  data.prefetch = 2  # Batches buffered per worker.
  data.read_threads = 2  # grain threads per process calling the decoder (PyAV drops the GIL).
  data.memory_cache_mb = 0  # >0: keep decoded videos in memory up to this budget per process.
  data.shuffle_buffer_seed = 0
  # True: every video in DATA/{split}/videos is used, with or without annotations (masked-video
  # pretraining on unlabeled videos; the annotations folder may be absent).
  data.unlabeled = False
  data.strict = False  # True: videos without annotations (and vice versa) are errors.
  data.max_corrupt_videos = 10  # Skipped corrupt videos in training before it becomes an error.
  data.max_segments = 8  # Action segments per video after padding.
  data.max_questions = 4  # QA pairs per video after padding.
  data.question_length = 16  # Tokens per question after padding.
  data.caption_length = 24  # Tokens per caption, with bos/eos, after padding.
  data.answer_vocab_size = 1000  # Top-K answers kept as classes.
  data.min_word_count = 1
  data.domains = ("sports", "tutorials", "news", "general")
  data.video = ml_collections.ConfigDict()
  data.video.num_frames = args.frames
  data.video.frame_size = args.frame_size
  data.video.decode_threads = 1  # FFmpeg threads per decode; 1 suits several grain workers.
  data.video.decode_size = 0  # Shorter side of decoded frames before cropping (0: frame_size).
  data.video.max_fps = 0.0  # >0: sample only frames shown at k / max_fps (bounds the cache).
  data.video.min_window = 0.8  # Training window: U(min_window, 1) of the video (1: whole).
  data.augment = ml_collections.ConfigDict()
  data.augment.enabled = True
  data.augment.flip = True
  # "a:b" pairs exchanged in action labels, questions, answers and captions of flipped clips.
  data.augment.flip_swap = ("left:right", "move_left:move_right")
  data.augment.min_crop_scale = 0.6
  data.augment.color_jitter = 0.1
  data.augment.temporal_jitter = True
  data.synthetic = ml_collections.ConfigDict()
  data.synthetic.num_videos = ml_collections.ConfigDict(
      dict(training=400, validation=50, test=100))
  data.synthetic.frame_size = 64
  data.synthetic.num_frames = 48
  data.synthetic.fps = 12
  data.synthetic.seed = 0
  data.synthetic.max_objects = 3  # Shapes per clip, 1 to 3.
  # Real-footage properties (hvlm_jax/data/footage.py): camera pan (px/frame) and zoom over a
  # textured world, sensor noise (std in [0, 1] units), JPEG-like quality (0: none).
  data.synthetic.footage = ml_collections.ConfigDict(dict(
      pan=(0.0, 0.0), zoom=1.0, texture=0.0, noise=0.0, quality=0))

  # ----- model --------------------------------------------------------------------------
  config.model = model = ml_collections.ConfigDict()
  model.hidden_size = 768
  model.num_layers = 12
  model.num_attention_heads = 12
  model.mlp_dim = 3072
  model.tubelet_size = (2, 16, 16)
  model.dropout_rate = 0.0
  model.attention_dropout_rate = 0.0
  # The blocks as one lax.scan over their stacked parameters: "auto" (where possible: not with
  # token merging or performer attention), "true" (required) or "false" (unrolled). Same
  # parameters and maths; faster to compile, and on CPU faster to run (12 blocks: 0.73 s a step
  # against 1.20 s; benchmarks/train/scan_layers/).
  model.scan_layers = "auto"
  # Motion streams added to the RGB input (clip mode): "difference" (frame differences as
  # extra tubelet channels), "flow" (per-token optical-flow descriptors, flow options below
  # under token_merging.flow). Two-stream style; the demo uses both.
  model.motion_input = ()
  # "patch": linear tubelet projection (ViViT); "conv": per-frame stride-2 3x3 convolutions to
  # the patch grid, then the tubelet's frames projected (Xiao et al. 2021; see encoder.py);
  # "hybrid": the sum of both.
  model.stem = "patch"
  # The conv stem's normalisation: "layer" (each pixel's channels) or "group" (GroupNorm over
  # the frame; learns shape sooner when supervised directly, encoder.py STEM_NORMS).
  model.stem_norm = "layer"
  # The conv stem's size: first-stage channels (0: hidden_size / patch * 2, at least 8),
  # doubling per stage up to hidden_size; and 3x3 convolutions per stage (the first strided).
  model.stem_width = 0
  model.stem_depth = 1
  # Space-to-depth factor: the conv stages stop at stride patch / fold and each token
  # concatenates its fold x fold cells before the projection (1: stages down to the patch grid).
  model.stem_fold = 1
  # Encoder architecture (defaults: the ViViT-style encoder above). init_from=hf:DIR sets them
  # from the checkpoint's config.json (VideoMAE, ViViT; README "Start from a pretrained
  # backbone"), so they rarely need writing by hand.
  model.position_embedding = "factorised"  # "factorised" (time + space), "joint", "sinusoidal".
  model.cls_token = False  # A CLS token (ViViT), kept last in the sequence.
  model.qkv_bias = "qkv"  # Projections with a bias: "qkv", "qv" (VideoMAE) or "none".
  model.layer_norm_epsilon = 1e-6
  model.gelu = "tanh"  # "tanh" (approximation) or "exact" (erf).
  model.final_norm = True  # LayerNorm after the last block.
  model.pooling = "none"  # Pooled output: "none", "mean" (+ fc_norm, VideoMAE), "cls".
  model.pool_norm_epsilon = 1e-5  # fc_norm's epsilon (pooling="mean").
  model.pixel_mean = (0.45, 0.45, 0.45)  # Per channel, on [0, 1] pixels.
  model.pixel_std = (0.225, 0.225, 0.225)
  model.pixel_channel_order = "rgb"  # "rgb" or "bgr" (the encoder flips before normalising).
  model.dtype = "float32"  # Compute dtype; training.mixed_precision switches it to bfloat16.
  model.param_dtype = "float32"

  model.attention = attention = ml_collections.ConfigDict()
  attention.type = args.attention
  attention.causal = False
  # implementation (full, strided, local_global): "auto" (cuDNN flash on NVIDIA GPUs in
  # bf16/fp16, Pallas splash on TPU, XLA elsewhere), "xla", "cudnn" or "splash".
  attention.full = ml_collections.ConfigDict(dict(implementation="auto"))
  # One block per type: its constructor options (plus `causal` above). Tokens are time-major,
  # P per frame (P = (frame_size / patch)^2, 196 at 224 px and 16 px patches). Options that
  # count tokens of a frame take 0 (or "frame") for "one frame of the token grid the block
  # sees", resolved when the model is built, so patterns stay frame-aligned at any resolution,
  # patch size and merging ratio; "frame/k" is a k-th of a frame; an explicit count is kept
  # (a misaligned one is warned about). Any token count works (padding is masked).
  attention.strided = ml_collections.ConfigDict(dict(stride=0, local=True,
                                                     implementation="auto"))
  attention.local_global = ml_collections.ConfigDict(dict(
      window=0, global_tokens="frame",  # "frame", "learned" or "none".
      num_global=1,  # Per frame ("frame") or in total ("learned").
      tokens_per_frame=0, query_chunk=1024,  # Queries per remat step (bounds memory).
      implementation="auto"))
  attention.cross_memory = ml_collections.ConfigDict(dict(
      memory_source="pooled",  # Encoder use (no memory given): "pooled" tokens or "learned".
      pool_size=0, capacity=16,  # Tokens per pooled entry; entries kept (MA-LMM merging).
      num_slots=16))  # Entries of the "learned" memory.
  attention.performer = ml_collections.ConfigDict(dict(
      num_features=256, redraw=True, feature_seed=0, eps=1e-6,
      chunk_size=64))  # Tokens per chunk of the causal prefix scan.
  attention.linear = ml_collections.ConfigDict(dict(eps=1e-6, chunk_size=64))
  attention.mamba = ml_collections.ConfigDict(dict(
      state_size=16, expand=2, conv_size=4, dt_rank=0,  # dt_rank 0: ceil(hidden_size / 16).
      # "chunked" (custom VJP recomputing chunk states), "scan" or "associative" (~2.6x
      # full attention's memory at 6272 tokens).
      bidirectional=True, scan_method="chunked",
      chunk_size=64))  # 64 vs 128: 3-4% faster fwd+bwd at 6272 tokens on CPU (README).
  attention.hierarchical = ml_collections.ConfigDict(dict(
      window=0, pool_sizes=("frame/4",),  # Coarse levels, e.g. (4, "frame"); hierarchical.py.
      query_chunk=1024))

  model.token_merging = tm = ml_collections.ConfigDict()
  tm.enabled = args.merging
  # Fraction of token-block work removed: mean tokens per block = (1 - ratio) * N.
  tm.target_compression_ratio = 0.5
  tm.schedule = "decreasing"  # "constant", "decreasing" or "w0,w1,..." (one weight per layer).
  tm.protect_fraction = 0.1  # Most important tokens (motion/saliency) never merged.
  tm.importance_weight = 1.0  # Edge score = cosine - importance_weight * max importance.
  # Default runtime weights of the two importance sources; the encoder call's
  # `merge_weights=(motion, saliency)` overrides them without recompiling.
  tm.use_motion = True
  tm.use_saliency = True
  tm.motion_source = "flow"  # "flow", "frame_difference" (RLT-style proxy) or "none".
  tm.features_mode = "similarity"  # Features input: "similarity" (ToMe only) or "off".
  tm.flow = ml_collections.ConfigDict(dict(
      levels=3, iterations=5, window_sigma=2.0,
      smooth_sigma=2.0,  # Flow regularisation / extrapolation std (px per level); 0: off.
      camera_compensation=True,  # Motion relative to each frame pair's camera motion.
      cells_per_token=4,  # Flow resolution: grid * cells_per_token pixels per side.
      min_motion=0.5))  # Pixels; scores m^2 / (m^2 + s^2), s = max(clip median m, min_motion).
  tm.saliency = ml_collections.ConfigDict(dict(
      edge=1.0, color_contrast=1.0, spectral_residual=1.0, center_prior=0.5,
      attention=0.0,  # Attention-entropy saliency on the tokens at each merge (vid-TLDR).
      attention_keys=128, cells_per_token=4))

  model.domain_modules = dm = ml_collections.ConfigDict()
  dm.num_domains = 4  # = len(data.domains).
  # LoRA targets: query, key, value, out, mlp_in, mlp_out. Rank 8 on query+value of a
  # 12-layer width-768 encoder: 294,912 parameters per domain.
  dm.lora = ml_collections.ConfigDict(dict(enabled=False, rank=8, alpha=16.0, dropout=0.0,
                                           targets=("query", "value")))
  # At inference, take the domain (LoRA adapter, hard expert) from the router's argmax
  # instead of batch["domain"]; builds the router.
  dm.use_router_for_lora = False
  # Router on a pooled thumbnail stem of the input (runs before the encoder). Built when
  # enabled, when use_router_for_lora, or for soft / top_k experts. mode: hard (domain
  # labels), soft (mixture of all experts), top_k. supervised: cross-entropy to the domain
  # labels (loss_weights.router); else Switch load balancing (loss_weights.router_balance).
  dm.router = ml_collections.ConfigDict(dict(enabled=False, mode="hard", top_k=1,
                                             hidden_size=128, pool_size=4, supervised=True))
  dm.experts = ml_collections.ConfigDict(dict(enabled=False, mlp_dim=0, dropout_rate=0.0))

  model.heads = heads = ml_collections.ConfigDict()
  heads.tasks = ("classification", "action_detection", "video_qa", "captioning")
  # Sizes from the data; the trainer fills them from the built vocabularies.
  heads.num_classes = 10  # Action classes (classification and detection).
  heads.vocab_size = 1000  # Word vocabulary (questions and captions).
  heads.num_answers = 1000  # Answer classes.
  # "attention" (learned probe), "mean" or "encoder" (the encoder's pooled output, model.pooling,
  # straight into the logits layer: an imported HF classifier's exact logits).
  heads.classification_pooling = "attention"
  heads.text = ml_collections.ConfigDict(dict(num_heads=0, mlp_dim=0, dropout_rate=0.0))
  heads.detection = ml_collections.ConfigDict(dict(
      num_layers=2, kernel_size=3, loss="focal", focal_alpha=0.25, focal_gamma=2.0,
      regression_loss="diou", regression_weight=1.0, smoothing_window=3, nms_threshold=0.5,
      pre_nms_top_k=200, max_detections=20, min_score=1e-3))
  # pool_video: the answer MLP also sees the mean of all video tokens, not only what the
  # question's cross-attention picked out (see benchmarks/appearance, fourth round).
  heads.qa = ml_collections.ConfigDict(dict(num_layers=2, pool_video=True))
  heads.captioning = ml_collections.ConfigDict(dict(
      num_layers=2, label_smoothing=0.1, beam_size=3, length_penalty=0.6, max_length=24))
  # Auxiliary training target on the synthetic dataset: a linear layer names the shape drawn on
  # each grid token, or background (num_classes = 3 shapes + 1), from the generator's object
  # layouts (data/synthetic.py, token_shape_labels); weight loss_weights.token_shape. Tokens that
  # carry shape let the QA head bind a colour to a shape (benchmarks/appearance, fifth round).
  heads.token_shape = ml_collections.ConfigDict(dict(enabled=False, num_classes=4))

  # Long videos (hvlm_jax/models/streaming.py): consecutive segments of one clip each
  # (data.video.num_frames frames over segment_seconds), a memory bank of compressed summary
  # tokens (MA-LMM merging of the most similar adjacent entries), detection stitched in seconds.
  model.streaming = ml_collections.ConfigDict(dict(
      enabled=True,  # Evaluation streams videos longer than auto_threshold segments.
      auto_threshold=1.0,  # In segments: stream when duration > auto_threshold * segment_seconds.
      segment_seconds=8.0,  # Video seconds per segment.
      memory_capacity=64,  # Bank entries kept (C); the bank never grows beyond it.
      summary_tokens=16,  # Entries one segment adds to the bank (K) before compression.
      train_segments=0,  # >0: train with memory on this many consecutive segments per video.
      truncation=2,  # Truncated backprop: gradients cross this many segments (0: all).
      remat_segments=True))  # Training keeps only the bank per segment, recomputes the rest.

  # ----- training -----------------------------------------------------------------------
  config.training = tr = ml_collections.ConfigDict()
  tr.num_steps = 0  # If 0, num_epochs decides.
  tr.num_epochs = 30
  tr.learning_rate = 3e-4
  tr.warmup_steps = 500
  tr.weight_decay = 0.05
  tr.gradient_clip = 1.0
  tr.mixed_precision = False
  tr.gradient_checkpointing = False
  tr.remat_policy = "nothing_saveable"
  tr.gradient_accumulation_steps = 1  # Micro-batches per optimizer update.
  # "supervised" (the task heads) or "masked_video" (VideoMAE pretraining of the encoder on
  # unlabeled clips: tube masking, pixel reconstruction; hvlm_jax/models/pretraining.py).
  # Fine-tune afterwards with init_from=PRETRAIN_WORKDIR.
  tr.objective = "supervised"
  tr.masked_video = ml_collections.ConfigDict(dict(
      mask_ratio=0.9, decoder_width=0, decoder_layers=2,  # Width 0: half the encoder's.
      decoder_heads=0, norm_pix=True))  # Heads 0: the encoder's; norm_pix: per-patch targets.
  tr.finetune = "full"  # "full", "lora" (adapters + router + heads) or "lora_only".
  # "none", "inverse_frequency" or "sports=2,news=1,..." (sampling weight per domain).
  tr.domain_balancing = "none"
  # Token-merging curriculum: the compression ratio rises from 0 to the target over
  # compression_warmup_steps in compression_stages steps (each stage compiles once);
  # progressive merging uses motion from the start and saliency from saliency_start_step.
  tr.compression_warmup_steps = 0
  tr.compression_stages = 3
  tr.saliency_start_step = 0
  # Performance: "start,end" traces those steps into WORKDIR/profile (TensorBoard's profile
  # plugin, Perfetto); peak_flops (per device) enables perf/mfu where the platform table
  # (hvlm_jax/train/perf.py) does not know the device (0: use the table).
  tr.profile_steps = ""
  tr.peak_flops = 0.0
  tr.log_every_steps = 50
  tr.eval_every_steps = 1000  # 0: no evaluation during training.
  tr.eval_max_batches = 0  # 0: the whole validation split.
  tr.eval_images = 3  # Validation videos drawn to TensorBoard at each evaluation.
  tr.checkpoint_every_steps = 1000
  tr.keep_checkpoints = 3  # Latest N kept...
  tr.keep_best_checkpoints = 1  # ...and, separately, the best N by best_metric.
  tr.best_metric = "val_loss"
  tr.best_mode = "min"
  # A workdir holds one run. "auto": resume it; a config that changes its parameters (model,
  # vocabulary-related data keys) is refused. "new_run": such a run is moved to
  # WORKDIR/previous_runs/ and a new one starts (an unchanged config still resumes).
  tr.resume = "auto"
  # NaN/Inf loss or gradient norm: "skip" leaves the state unchanged (counted in
  # train/nonfinite_steps; an error after max_nonfinite_steps in a row), "stop" stops at once.
  tr.nonfinite = "skip"
  tr.max_nonfinite_steps = 10
  tr.loss_weights = ml_collections.ConfigDict(
      dict(classification=1.0, action_detection=0.33, video_qa=0.33, captioning=0.34,
           router=0.1, router_balance=0.01, token_shape=1.0))

  # ----- mesh ---------------------------------------------------------------------------
  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))

  if args.runlocal:
    model.hidden_size, model.num_layers, model.num_attention_heads, model.mlp_dim = 64, 2, 4, 128
    data.video.num_frames, data.video.frame_size, data.batch_size = 8, 32, 4
    tr.num_steps, tr.num_epochs, tr.warmup_steps = 10, 0, 2
  return config
