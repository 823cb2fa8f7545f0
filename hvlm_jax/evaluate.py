"""`python -m hvlm_jax.evaluate --workdir=RUN [--step=latest|best|N] [--split=test] [--config.a.b=v]`."""
from hvlm_jax.main import run_main

if __name__ == "__main__":
  run_main("evaluate")
