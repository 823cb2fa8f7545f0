"""`python -m hvlm_jax.predict --workdir=RUN [--step=best|latest|N] VIDEO [VIDEO ...]
[--question="..."]... [--out=DIR] [--domain=NAME]`: see hvlm_jax/eval/predict.py."""
from hvlm_jax.main import run_main

if __name__ == "__main__":
  run_main("predict")
