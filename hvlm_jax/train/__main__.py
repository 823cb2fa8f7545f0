"""`python -m hvlm_jax.train --config=configs/demo.py --workdir=runs/demo [--config.a.b=v]`."""
from hvlm_jax.main import run_main

if __name__ == "__main__":
  run_main("train")
