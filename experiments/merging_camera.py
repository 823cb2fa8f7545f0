"""Token merging on footage filmed by a moving camera: what should steer the merge?

    python experiments/run.py --study=merging_camera --seeds=0,1,2 --steps=300 \
        --data_dir=data/synthetic_camera_study

The synthetic clips are filmed with real-footage properties (hvlm_jax/data/footage.py): the
camera pans 0.25 px per frame to the right over a textured world (12 px over a 4 s clip,
0.75 px between the 16 frames the model sees, so objects stay in view), with 1% sensor
noise, so every background token moves in the frame. Merging at ratio 0.5 in every variant; only what
the merge protects differs: `similarity` (ToMe, no importance), `motion` (optical flow
relative to each frame pair's fitted camera motion, the default) and `motion_absolute`
(the same flow without camera compensation, so the panning background looks as important as
the moving actor). Saliency is off in all three. The dataset differs from the demo's, so it
needs its own --data_dir (an existing dataset of other settings is refused, not overwritten).
"""
from hvlm_jax import config as config_lib
from hvlm_jax.config import import_sibling

common = import_sibling(__file__, "common.py")

# Every variant: the footage, and a dataset directory of its own.
STUDY_OVERRIDES = {"data.synthetic.footage.pan": (0.25, 0.0),
                   "data.synthetic.footage.texture": 28.0,
                   "data.synthetic.footage.noise": 0.01,
                   "data.dir": "data/synthetic_camera_study"}
_ON = {"model.token_merging.enabled": True,
       "model.token_merging.target_compression_ratio": 0.5,
       "model.token_merging.use_saliency": False}
VARIANTS = {
    "similarity": dict(_ON, **{"model.token_merging.use_motion": False}),
    "motion": dict(_ON, **{"model.token_merging.use_motion": True}),
    "motion_absolute": dict(_ON, **{"model.token_merging.use_motion": True,
                                    "model.token_merging.flow.camera_compensation": False}),
}


def get_config(arg=None):
  config = common.study_config(arg, VARIANTS)
  config_lib.apply_overrides(config, STUDY_OVERRIDES)
  return config
