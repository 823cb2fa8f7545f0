"""`python -m hvlm_jax.evaluate --config=... --workdir=... [--step=latest|best|N] [--split=test]`."""
from hvlm_jax.main import run_main

if __name__ == "__main__":
  run_main("evaluate")
