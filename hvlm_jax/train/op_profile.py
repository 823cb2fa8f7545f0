"""Where a compiled step's time goes: a profiler trace's op events joined with the step's HLO.

    summary = op_profile.summarize(compiled.as_text(), op_profile.latest_trace(log_dir))
    print(op_profile.markdown(summary))

The trace (`jax.profiler` / `training.profile_steps`) names each executed HLO instruction and
its duration; the optimised HLO text says what each one computes. From the HLO:
  flops   2 x multiply-adds of every dot and convolution inside the instruction (a fusion's
          called computations included; a strided convolution's gradients count as many as
          its forward). Loop bodies run as their own instructions, so a while loop's work is
          counted once per iteration it ran (XLA's cost analysis counts it once per program).
          Elementwise work is not counted.
  scope   the model path of the JAX operation it came from (`op_name` metadata, e.g.
          `encoder/block_*/attention`), and whether it is forward or backward (`transpose(`
          in the name). An instruction XLA made itself (a layout copy) has no scope.
  dots    the shapes and dimension numbers of every dot, to time them alone.
Per scope and per run of the program: time (the events' durations, nested instruction events
subtracted), FLOPs and their rate. The times add up over the threads that ran instructions
side by side, so on a multi-core CPU their sum can exceed the wall time; compare shares.

XLA:CPU runs convolutions on its thread pool after the instruction's event has ended, so a
convolution's event (hence its scope's time) covers only its dispatch; that time is missing
from the instruction total, and is part of the gap between it and the threads' spans
(`span_s`, first to last instruction event per thread, summed).
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import glob
import gzip
import json
import math
import os
import re
import statistics

_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s([a-z][\w\-]*)\((.*)$")
_DIMS = re.compile(r"^\(?\w+\[([\d,]*)\]")
# Components of an op_name that are transformations of a scope: jvp(Model), jit(f), ...
_WRAPPER = re.compile(r"^(\w+)\((.*)\)$")
_LAYER = re.compile(r"(?<=_)\d+$")
# Components a loop or a checkpoint adds to the op_names inside it (`encoder/while/body/
# closed_call/block_*/mlp`): dropped, so a scanned block's scope reads like an unrolled one's.
_LOOP_PLUMBING = frozenset(("while", "body", "cond", "closed_call", "checkpoint", "remat",
                            "rematted_computation"))


@dataclasses.dataclass(frozen=True)
class HloOp:
  name: str
  opcode: str
  shape: str
  flops: float
  scope: str        # Model path ("" when XLA made the instruction itself).
  backward: bool
  dots: tuple = ()  # DotSpec of every dot inside it.


@dataclasses.dataclass(frozen=True)
class DotSpec:
  """One dot's operand shapes and dimension numbers (as `jax.lax.dot_general` takes them)."""
  lhs: tuple[int, ...]
  rhs: tuple[int, ...]
  contracting: tuple[tuple[int, ...], tuple[int, ...]]
  batch: tuple[tuple[int, ...], tuple[int, ...]]

  @property
  def flops(self) -> float:
    free = lambda shape, used: math.prod(n for i, n in enumerate(shape) if i not in used)
    (lc, rc), (lb, _) = self.contracting, self.batch
    return 2.0 * (math.prod(self.lhs[i] for i in lb) * math.prod(self.lhs[i] for i in lc)
                  * free(self.lhs, lc + lb) * free(self.rhs, rc + self.batch[1]))


def _dims(shape: str) -> list[int] | None:
  m = _DIMS.match(shape)
  return [int(d) for d in m.group(1).split(",") if d] if m else None


def _computations(hlo: str) -> dict[str, list[str]]:
  comps, current = {}, None
  for line in hlo.splitlines():
    if current is None:
      m = _COMPUTATION.match(line)
      if m:
        current = comps.setdefault(m.group(1), [])
    elif line.strip() == "}":
      current = None
    else:
      current.append(line)
  return comps


def _operands(args: str) -> list[str]:
  """Operand names of an instruction's argument text (typed or untyped operands)."""
  depth, end = 1, len(args)
  for i, ch in enumerate(args):
    depth += ch == "("
    depth -= ch == ")"
    if depth == 0:
      end = i
      break
  return re.findall(r"%([\w.\-]+)", args[:end])


def _conv_flops(shape: str, args: str, shapes: dict) -> float:
  """Every output element sums over the kernel's other dimensions (its spatial window and
  input features, already divided by any feature grouping), padding included. An input
  dilated by d (a strided convolution's input gradient) is zeros but for 1 in d: those
  products are not counted, so a gradient counts the FLOPs of its forward."""
  out, operands = _dims(shape), _operands(args)
  rhs = shapes.get(operands[1]) if len(operands) >= 2 else None
  m = re.search(r"dim_labels=\w+_(\w+)->", args)
  if out is None or rhs is None or not m or len(m.group(1)) != len(rhs):
    return 0.0
  dilated = re.search(r"lhs_dilate=([\dx]+)", args)
  zeros = math.prod(int(d) for d in dilated.group(1).split("x")) if dilated else 1
  return 2.0 * math.prod(out) * math.prod(n for c, n in zip(m.group(1), rhs) if c != "o") / zeros


def entry_instructions(hlo: str) -> list[str]:
  """Names of the ENTRY computation's instructions (those a run executes at top level)."""
  m = re.search(r"^ENTRY\s+%?([\w.\-]+)", hlo, re.M)
  lines = _computations(hlo).get(m.group(1), []) if m else []
  return [i.group(1) for i in map(_INSTRUCTION.match, lines) if i]


def _dot_spec(args: str, shapes: dict) -> DotSpec | None:
  operands = _operands(args)
  lhs, rhs = (shapes.get(o) for o in operands[:2]) if len(operands) >= 2 else (None, None)
  if lhs is None or rhs is None:
    return None
  dims = lambda key: tuple(int(i) for i in (re.search(key + r"=\{([\d,]*)\}", args) or
                                            re.match("()", "")).group(1).split(",") if i)
  return DotSpec(tuple(lhs), tuple(rhs),
                 (dims("lhs_contracting_dims"), dims("rhs_contracting_dims")),
                 (dims("lhs_batch_dims"), dims("rhs_batch_dims")))


def _op_names(line: str) -> list[str]:
  m = re.search(r'op_name="([^"]*)"', line)
  return m.group(1).split(";") if m else []


def scope_of(op_name: str, depth: int = 4, merge_layers: bool = True) -> tuple[str, bool]:
  """(model path, backward?) of a JAX op_name.

  `jit(train_step)/transpose(jvp(Model))/Model/Model.encode/encoder/block_1/mlp/dot_general`
  -> (`Model.encode/encoder/block_*/mlp`, True): jit dropped, other transformations unwrapped
  (`jvp(layer_0)` -> `layer_0`), repeats, the primitive, loop and checkpoint plumbing
  (`while/body/closed_call`) and a module listed before its own method call dropped, layer
  numbers merged (`block_*`), at most `depth` components kept.
  """
  fused = op_name.find("/(")  # A fused location, `prefix/(a/b:c/d)`: take its first, a/b.
  if fused >= 0:
    op_name = op_name[:fused + 1] + op_name[fused + 2:].removesuffix(")").split(":")[0]
  kept = []
  for p in op_name.split("/")[:-1]:
    if p == "call_exported" or p in _LOOP_PLUMBING:  # Trace-cache programs; loop bodies.
      continue
    while (m := _WRAPPER.match(p)) and m.group(1) not in ("jit", "pjit"):
      p = m.group(2)  # jvp(Model) -> Model; transpose(jvp(layer_0)) -> layer_0.
    if not p or _WRAPPER.match(p) or (kept and p == kept[-1]):
      continue
    if kept and p.startswith(kept[-1] + "."):
      kept[-1] = p
    else:
      kept.append(p)
  if merge_layers:
    kept = [_LAYER.sub("*", p) for p in kept]
  return "/".join(kept[:depth]), "transpose(" in op_name


def hlo_ops(hlo: str, depth: int = 4, merge_layers: bool = True) -> dict[str, HloOp]:
  """Every instruction of an optimised HLO module text, by name (those inside fusions too;
  a fusion's FLOPs include its computations', so do not sum over all instructions)."""
  shapes, parsed = {}, []
  for comp, lines in _computations(hlo).items():
    for m in filter(None, map(_INSTRUCTION.match, lines)):
      shapes[m.group(1)] = _dims(m.group(2))
      parsed.append((comp, m))
  own = {}  # Per instruction: (conv FLOPs, dots, op_names, called computations).
  for _, m in parsed:
    name, shape, opcode, args = m.groups()
    spec = _dot_spec(args, shapes) if opcode == "dot" else None
    own[name] = (_conv_flops(shape, args, shapes) if opcode == "convolution" else 0.0,
                 [spec] if spec else [], _op_names(m.group(0)),
                 re.findall(r"calls=%?([\w.\-]+)", m.group(0)))
  members = collections.defaultdict(list)
  for comp, m in parsed:
    members[comp].append(m.group(1))

  @functools.cache
  def total(name):  # (FLOPs, dots, op_names) of an instruction and what it calls.
    flops, specs, found, calls = own[name]
    specs, found = list(specs), list(found)
    for member in (i for c in calls for i in members[c]):
      f, d, n = total(member)
      flops, specs, found = flops + f, specs + d, found + n
    return flops, specs, found

  ops = {}
  for _, m in parsed:
    name, shape, opcode = m.group(1), m.group(2), m.group(3)
    conv_flops, specs, found = total(name)
    found = own[name][2] or found  # Its own op_name, else the most frequent inside it.
    scope, backward = ("", False)
    if found:
      scope, backward = scope_of(collections.Counter(found).most_common(1)[0][0], depth,
                                   merge_layers)
    ops[name] = HloOp(name, opcode, shape.split("{")[0],
                      conv_flops + sum(d.flops for d in specs), scope, backward, tuple(specs))
  return ops


def program_flops(hlo: str) -> tuple[float, int]:
  """(FLOPs of one run of an optimised HLO module, loops whose trip count XLA did not know).

  2 x the multiply-adds of every dot and convolution the ENTRY computation runs, fusions and
  calls included; a while loop's body and condition counted once per iteration of its
  `known_trip_count` (nested loops multiply); a conditional's costliest branch. A loop without
  a known trip count is counted once, as XLA's own cost analysis counts every loop."""
  comps = {c: list(filter(None, map(_INSTRUCTION.match, lines)))
           for c, lines in _computations(hlo).items()}
  shapes = {m.group(1): _dims(m.group(2)) for ms in comps.values() for m in ms}
  unknown = 0

  @functools.cache
  def computation(comp: str) -> float:
    return sum(instruction(m) for m in comps.get(comp, ()))

  def instruction(m) -> float:
    nonlocal unknown
    _, shape, opcode, args = m.groups()
    line = m.group(0)
    if opcode == "dot":
      spec = _dot_spec(args, shapes)
      return spec.flops if spec else 0.0
    if opcode == "convolution":
      return _conv_flops(shape, args, shapes)
    if opcode == "while":
      body = re.search(r"body=%?([\w.\-]+)", line).group(1)
      cond = re.search(r"condition=%?([\w.\-]+)", line).group(1)
      trips = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', line)
      unknown += trips is None
      return int(trips.group(1) if trips else 1) * (computation(body) + computation(cond))
    if opcode == "conditional":
      branches = re.search(r"branch_computations=\{([^}]*)\}", line)
      found = (re.findall(r"%?([\w.\-]+)", branches.group(1)) if branches else
               re.findall(r"(?:true|false)_computation=%?([\w.\-]+)", line))
      return max((computation(c) for c in found), default=0.0)
    return sum(computation(c) for c in re.findall(r"(?:calls|to_apply)=%?([\w.\-]+)", line)
               if opcode in ("fusion", "call"))

  entry = re.search(r"^ENTRY\s+%?([\w.\-]+)", hlo, re.M)
  return (computation(entry.group(1)) if entry else 0.0), unknown


def _direction(op: HloOp) -> str:
  return "" if not op.scope else "backward" if op.backward else "forward"


def latest_trace(log_dir: str) -> str:
  """The newest `*.trace.json.gz` that `jax.profiler` wrote under log_dir."""
  found = glob.glob(os.path.join(log_dir, "plugins", "profile", "*", "*.trace.json.gz"))
  if not found:
    raise FileNotFoundError(f"{log_dir}: no profiler trace (plugins/profile/*/*.trace.json.gz)"
                            " under it.")
  return max(found, key=os.path.getmtime)


def op_times(events: list[dict], names) -> tuple[dict[str, float], dict[str, int], float]:
  """Per instruction name: seconds (nested instruction events subtracted) and call count;
  plus the threads' spans, summed: first instruction event's start to the last one's end.

  events: Chrome-trace "X" events; only those named like an instruction count.
  """
  by_thread = collections.defaultdict(list)
  for e in events:
    if e.get("ph") == "X" and e.get("name") in names:
      by_thread[(e.get("pid"), e.get("tid"))].append(e)
  seconds, counts, span = collections.defaultdict(float), collections.Counter(), 0.0
  for es in by_thread.values():
    es.sort(key=lambda e: (e["ts"], -e["dur"]))
    span += (max(e["ts"] + e["dur"] for e in es) - es[0]["ts"]) / 1e6
    stack = []  # Open events: [name, end, duration, nested duration] (microseconds).
    for e in es + [None]:
      while stack and (e is None or e["ts"] >= stack[-1][1]):
        name, _, duration, nested = stack.pop()
        seconds[name] += (duration - nested) / 1e6
        if stack:
          stack[-1][3] += duration
      if e is not None:
        stack.append([e["name"], e["ts"] + e["dur"], e["dur"], 0.0])
        counts[e["name"]] += 1
  return dict(seconds), dict(counts), span


def summarize(hlo: str, trace_path: str, *, runs: int | None = None, top: int = 20,
              depth: int = 4, merge_layers: bool = True) -> dict:
  """Per-scope and per-instruction time and FLOPs of one run of a program, the mean of the
  trace's `runs` runs. A step on N local devices is N runs (one per device); None: the
  most common count of an instruction's events, which is the number of runs.

  Returns {"runs", "op_s", "span_s", "flops", "flop_op_s", "scopes", "top", "dots"}, per run:
  scopes and instructions sorted by time, distinct dots (shapes, dimension numbers, calls,
  FLOPs) by FLOPs. See the module docstring for what is counted.
  """
  ops = hlo_ops(hlo, depth, merge_layers)
  try:
    with gzip.open(trace_path, "rt") as fh:
      events = json.load(fh).get("traceEvents", [])
  except (OSError, EOFError, ValueError, AttributeError) as e:
    raise ValueError(f"{trace_path}: not a readable profiler trace ({e}).") from None
  seconds, counts, span = op_times(events, ops)
  if not seconds:
    raise ValueError(f"{trace_path}: no event of this program's instructions; was it traced "
                     "while the program ran?")
  runs = runs or statistics.mode(counts.values())
  scopes = collections.defaultdict(lambda: dict(seconds=0.0, flops=0.0, ops=0))
  for name, s in seconds.items():
    op = ops[name]
    key = (op.scope or "(made by XLA)", _direction(op))
    row = scopes[key]
    row["seconds"] += s / runs
    row["flops"] += op.flops * counts[name] / runs
    row["ops"] += 1
  total = sum(seconds.values()) / runs
  rows = [dict(scope=k[0], direction=k[1], **v, share=v["seconds"] / total,
               gflops_per_s=v["flops"] / v["seconds"] / 1e9 if v["seconds"] else 0.0)
          for k, v in scopes.items()]
  rows.sort(key=lambda r: -r["seconds"])
  flop_s = sum(s for n, s in seconds.items() if ops[n].flops) / runs
  top_ops = sorted(seconds, key=lambda n: -seconds[n])[:top]
  calls = collections.Counter()  # Runs of each distinct dot, per run of the program.
  for name, n in counts.items():
    for spec in ops[name].dots:
      calls[spec] += n / runs
  return dict(
      runs=runs, op_s=total, span_s=span / runs, flops=sum(r["flops"] for r in rows),
      flop_op_s=flop_s, scopes=rows,
      dots=[dict(dataclasses.asdict(spec), calls=c, flops=spec.flops * c)
            for spec, c in sorted(calls.items(), key=lambda kv: -kv[0].flops * kv[1])],
      top=[dict(name=n, opcode=ops[n].opcode, shape=ops[n].shape, scope=ops[n].scope,
                direction=_direction(ops[n]),
                seconds=seconds[n] / runs, calls=counts[n] / runs,
                gflop=ops[n].flops * counts[n] / runs / 1e9) for n in top_ops])


def markdown(summary: dict, max_scopes: int = 30) -> str:
  """Tables of a `summarize` result."""
  s = summary
  lines = [
      f"Per run of the program (mean of {s['runs']} traced; a step on N devices is N runs): "
      f"instruction time {1e3 * s['op_s']:.1f} ms "
      f"(summed over threads; their spans {1e3 * s['span_s']:.1f} ms), "
      f"{s['flops'] / 1e9:.2f} GFLOP in dots and convolutions. Instructions holding a dot or "
      f"convolution: {1e3 * s['flop_op_s']:.1f} ms ({s['flop_op_s'] / s['op_s']:.0%} of the "
      "instruction time).", "",
      "| scope | direction | ms | share | GFLOP | GFLOP/s | instructions |",
      "|---|---|---|---|---|---|---|"]
  for r in s["scopes"][:max_scopes]:
    rate = f"{r['gflops_per_s']:.1f}" if r["flops"] else ""
    gflop = f"{r['flops'] / 1e9:.3f}" if r["flops"] else ""
    lines.append(f"| {r['scope']} | {r['direction']} | {1e3 * r['seconds']:.1f} | "
                 f"{r['share']:.1%} | {gflop} | {rate} | {r['ops']} |")
  if len(s["scopes"]) > max_scopes:
    rest = s["scopes"][max_scopes:]
    lines.append(f"| ({len(rest)} more scopes) | | {1e3 * sum(r['seconds'] for r in rest):.1f}"
                 f" | {sum(r['share'] for r in rest):.1%} | | | |")
  lines += ["", "| instruction | shape | scope | direction | ms | GFLOP |", "|---|---|---|---|---|---|"]
  for t in s["top"]:
    gflop = f"{t['gflop']:.3f}" if t["gflop"] else ""
    lines.append(f"| {t['name']} ({t['opcode']}) | {t['shape']} | {t['scope'] or '(made by XLA)'} | "
                 f"{t['direction']} | {1e3 * t['seconds']:.2f} | {gflop} |")
  return "\n".join(lines) + "\n"

