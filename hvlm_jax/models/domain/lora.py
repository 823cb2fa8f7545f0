"""Multi-domain LoRA (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models").

y = x W + b + (alpha / r) * dropout(x) A[d] B[d], where d is each example's domain. `A` is
drawn at random and `B` starts at zero, so a fresh adapter leaves the model unchanged.
Every example of a batch gathers its own domain's (A, B): one compiled program serves a
batch that mixes domains. Cost per example: O(in * r + r * out) parameters gathered and
O(tokens * r * (in + out)) extra FLOPs.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import linen as nn

from hvlm_jax.models.layers import Dtype, partitioned

# Names a LoRA target may take. Attention families map their projections onto these names.
TARGETS = ("query", "key", "value", "out", "mlp_in", "mlp_out")


@dataclasses.dataclass(frozen=True)
class LoRASpec:
  """Which projections get adapters, and their shape. Hashable: a linen attribute."""
  rank: int = 8
  alpha: float = 16.0
  dropout: float = 0.0
  num_domains: int = 4
  targets: tuple[str, ...] = ("query", "value")

  def __post_init__(self):
    unknown = set(self.targets) - set(TARGETS)
    if unknown:
      raise ValueError(f"config.model.domain_modules.lora.targets has unknown names "
                       f"{sorted(unknown)}; known: {', '.join(TARGETS)}.")

  def rank_for(self, target: str) -> int:
    return self.rank if target in self.targets else 0


class LoRADense(nn.Module):
  """Dense layer with an optional per-domain low-rank update.

  Attributes:
    features: output width.
    kernel_axes: logical axis names of the (in, out) kernel.
    rank: LoRA rank; 0 means a plain Dense (no adapter parameters at all).
  Call: `(x: (B, ..., in), domain: (B,) int32 | None) -> (B, ..., out)`. With `domain=None`
  the adapters are skipped (the base model).
  """
  features: int
  kernel_axes: tuple[str | None, str | None] = ("embed", "joined_kv")
  use_bias: bool = True
  rank: int = 0
  alpha: float = 16.0
  dropout: float = 0.0
  num_domains: int = 4
  kernel_init: nn.initializers.Initializer = nn.initializers.xavier_uniform()
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, domain: jax.Array | None = None, *,
               deterministic: bool = True) -> jax.Array:
    d_in = x.shape[-1]
    kernel = self.param("kernel", partitioned(self.kernel_init, self.kernel_axes),
                        (d_in, self.features), self.param_dtype)
    x = x.astype(self.dtype)
    y = jnp.einsum("...i,io->...o", x, kernel.astype(self.dtype))
    if self.use_bias:
      bias = self.param("bias", partitioned(nn.initializers.zeros, (self.kernel_axes[1],)),
                        (self.features,), self.param_dtype)
      y = y + bias.astype(self.dtype)
    if self.rank == 0:
      return y
    lora_a = self.param(
        "lora_a", partitioned(nn.initializers.he_uniform(in_axis=1, out_axis=2),
                              ("domain", self.kernel_axes[0], "lora_rank")),
        (self.num_domains, d_in, self.rank), self.param_dtype)
    lora_b = self.param("lora_b", partitioned(nn.initializers.zeros,
                                              ("domain", "lora_rank", self.kernel_axes[1])),
                        (self.num_domains, self.rank, self.features), self.param_dtype)
    if domain is None:
      return y
    x = nn.Dropout(self.dropout)(x, deterministic=deterministic)
    a = lora_a[domain].astype(self.dtype)  # (B, in, r)
    b = lora_b[domain].astype(self.dtype)  # (B, r, out)
    low = jnp.einsum("b...i,bir->b...r", x, a)
    return y + (self.alpha / self.rank) * jnp.einsum("b...r,bro->b...o", low, b)


def lora_dense(features: int, target: str, lora: LoRASpec | None, *, name: str,
               kernel_axes=("embed", "joined_kv"), use_bias: bool = True,
               dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
               kernel_init=nn.initializers.xavier_uniform()) -> LoRADense:
  """A LoRADense for projection `target`, with an adapter only if `lora` targets it."""
  rank = lora.rank_for(target) if lora is not None else 0
  return LoRADense(
      features, kernel_axes=kernel_axes, use_bias=use_bias, rank=rank,
      alpha=lora.alpha if lora else 16.0, dropout=lora.dropout if lora else 0.0,
      num_domains=lora.num_domains if lora else 1, kernel_init=kernel_init, name=name,
      dtype=dtype, param_dtype=param_dtype)


# ----- merging adapters into the base weights ------------------------------------------------
# The helpers below walk a parameter tree (plain, FrozenDict, or boxed with logical axis
# metadata, as `init` returns it) and find LoRADense parameters by their names: a mapping that
# holds `kernel`, `lora_a` and `lora_b`.

ADAPTER_NAMES = ("lora_a", "lora_b")


def _unbox(x):
  return x.unbox() if isinstance(x, nn.meta.AxisMetadata) else x


def _rebox(old, new):
  return old.replace_boxed(new) if isinstance(old, nn.meta.AxisMetadata) else new


def _is_lora_node(node) -> bool:
  return isinstance(node, Mapping) and all(k in node for k in ("kernel",) + ADAPTER_NAMES)


def _lora_delta(lora_a, lora_b, domain, alpha: float) -> jax.Array:
  """(alpha / r) A[domain] B[domain]: the (in, out) update of one domain, in float32."""
  a = jnp.asarray(_unbox(lora_a))[domain].astype(jnp.float32)
  b = jnp.asarray(_unbox(lora_b))[domain].astype(jnp.float32)
  return (alpha / a.shape[-1]) * (a @ b)


def merge_lora(params, domain, *, alpha: float = 16.0):
  """Folds domain `domain`'s adapters into the base kernels: W <- W + (alpha / r) A[d] B[d].

  Args:
    params: a parameter tree with LoRADense adapters (boxed or not).
    domain: int (or int32 scalar) domain id.
    alpha: the LoRA alpha the model was built with (config.model.domain_modules.lora.alpha);
      the rank is read from the adapter shapes.
  Returns:
    The same tree without `lora_a` / `lora_b` leaves: the parameters of the same model built
    with LoRA disabled, whose outputs equal the adapted model's for domain `domain` (within
    float tolerance) at no extra cost per token.
  """
  def visit(node):
    if not isinstance(node, Mapping):
      return node
    out = {k: visit(v) for k, v in node.items()}
    if _is_lora_node(out):
      kernel = out["kernel"]
      base = _unbox(kernel)
      merged = base.astype(jnp.float32) + _lora_delta(out.pop("lora_a"), out.pop("lora_b"),
                                                      domain, alpha)
      out["kernel"] = _rebox(kernel, merged.astype(base.dtype))
    return out
  return visit(params)


def lora_adapters(params):
  """The adapter leaves of `params` alone: a tree of {path: {lora_a, lora_b}} mappings."""
  def visit(node):
    if not isinstance(node, Mapping):
      return None
    if _is_lora_node(node):
      return {k: node[k] for k in ADAPTER_NAMES}
    children = {k: visit(v) for k, v in node.items()}
    children = {k: v for k, v in children.items() if v}
    return children or None
  return visit(params) or {}


def unmerge_lora(merged, adapters, domain, *, alpha: float = 16.0):
  """Inverse of merge_lora: subtracts domain `domain`'s update and re-inserts the adapters.

  `adapters` is `lora_adapters(params)` of the unmerged tree. Lets a deployment that serves a
  merged domain switch to another one: unmerge, then merge the next.
  """
  def visit(node, ad):
    if not isinstance(node, Mapping):
      return node
    out = {k: visit(v, ad.get(k, {}) if isinstance(ad, Mapping) else {})
           for k, v in node.items()}
    if isinstance(ad, Mapping) and all(k in ad for k in ADAPTER_NAMES) and "kernel" in out:
      kernel = out["kernel"]
      base = _unbox(kernel)
      restored = base.astype(jnp.float32) - _lora_delta(ad["lora_a"], ad["lora_b"], domain,
                                                        alpha)
      out["kernel"] = _rebox(kernel, restored.astype(base.dtype))
      out.update({k: ad[k] for k in ADAPTER_NAMES})
    return out
  return visit(merged, adapters)


# ----- which parameters train -----------------------------------------------------------------

# "all": full fine-tuning. "lora": only the adapters (the frozen backbone and heads are shared
# by every domain). "lora_and_heads": adapters plus everything outside the encoder (task heads,
# domain experts, router), the usual recipe when a new domain also brings new data.
TRAINABLE_MODES = ("all", "lora", "lora_and_heads")


def _path_names(path) -> list[str]:
  names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
  names = [n for n in names if n != "value"]  # The boxed leaf's own attribute.
  return names[1:] if names and names[0] == "params" else names


def is_trainable(names: list[str], mode: str) -> bool:
  """Whether the parameter at path `names` (module names, then leaf name) trains in `mode`."""
  if mode not in TRAINABLE_MODES:
    raise ValueError(f"LoRA trainable mode {mode!r} is not one of "
                     f"{', '.join(TRAINABLE_MODES)}.")
  if mode == "all":
    return True
  adapter = bool(names) and names[-1] in ADAPTER_NAMES
  if mode == "lora":
    return adapter
  return adapter or (bool(names) and names[0] != "encoder")


def trainable_mask(params, mode: str = "all"):
  """A tree of bools with the structure of `params`: True where the leaf trains in `mode`.

  Use with `optax.masked`, or `freeze_untrainable` below.
  """
  return jax.tree_util.tree_map_with_path(lambda p, _: is_trainable(_path_names(p), mode),
                                          params)


def freeze_untrainable(tx, params, mode: str = "all"):
  """Wraps optimizer `tx` so that parameters outside `mode` get zero updates.

  Frozen parameters keep no optimizer state and escape weight decay (optax.set_to_zero).
  """
  import optax  # Local: the model files need no optimizer otherwise.
  if mode == "all":
    return tx
  labels = jax.tree_util.tree_map(lambda t: "train" if t else "frozen",
                                  trainable_mask(params, mode))
  return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)


def count_parameters(params, mask=None) -> int:
  """Number of scalars in `params` (only where `mask` is True, if given)."""
  leaves = jax.tree_util.tree_leaves(params)
  if mask is None:
    return int(sum(x.size for x in leaves))
  flags = jax.tree_util.tree_leaves(mask)
  return int(sum(x.size for x, keep in zip(leaves, flags) if keep))


def lora_parameter_summary(params, num_domains: int) -> dict[str, float]:
  """Counts of `params` (arrays or ShapeDtypeStructs from jax.eval_shape).

  Returns total parameters, adapter parameters (all domains and per domain) and the
  fraction of the model one domain's adapter is.
  """
  total = count_parameters(params)
  adapters = count_parameters(params, trainable_mask(params, "lora"))
  per_domain = adapters // max(num_domains, 1)
  return dict(total=total, lora_all_domains=adapters, lora_per_domain=per_domain,
              lora_fraction_per_domain=per_domain / max(total - adapters, 1))


def lora_parameters_per_domain(num_layers: int, hidden_size: int, mlp_dim: int, rank: int,
                               targets: tuple[str, ...]) -> int:
  """Closed form: adapter scalars one domain adds to the encoder, r * (in + out) per target.

  Rank 8 on query and value of a 12-layer width-768 encoder: 12 * 2 * 8 * (768 + 768) =
  294,912 (about 0.34% of ViViT-B's 86M).
  """
  shapes = dict(query=(hidden_size, hidden_size), key=(hidden_size, hidden_size),
                value=(hidden_size, hidden_size), out=(hidden_size, hidden_size),
                mlp_in=(hidden_size, mlp_dim), mlp_out=(mlp_dim, hidden_size))
  return num_layers * sum(rank * sum(shapes[t]) for t in targets)
