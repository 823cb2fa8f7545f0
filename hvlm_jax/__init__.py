"""hvlm-jax: HierarchicalVLM for long-form video understanding in JAX/Flax."""
