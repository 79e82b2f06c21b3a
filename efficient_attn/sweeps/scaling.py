"""Scaling of sequence parallelism over P simulated devices: per-device memory, communication, time.

    python experiments/scaling.py --preset quick          # results/scaling/quick/
    python experiments/scaling.py --preset cpu --engines ring --devices 1,2,4,8

One row per (mode, engine, P): a training pass (forward and backward of sum(out * w) with
respect to q, k, v) of one attention layer with the sequence split over a ``seq`` mesh axis
of P devices.

- ``weak``: the sequence length per device is fixed (T = n P): ideal scaling keeps the
  per-device memory flat.
- ``strong``: the total length is fixed (T = n max(P)): ideal scaling divides the
  per-device memory by P.

Engines: ``ring`` (causal ring attention with zigzag placement, ``parallel.ring``, given its
input already in zigzag order, as a model keeping that order end to end would),
``context_gated`` (context-parallel gated linear attention with scalar decays,
``parallel.context_linear``) and ``lm``: a whole training step (gradient of the next-token
loss with respect to every parameter) of a small causal LM (``lm_layers`` layers of
width heads x head_dim, MLP 4x) whose attention is made ring attention by
``parallel.models.sequence_parallel`` on every P (P = 1 included, so the baseline runs the
same kernels), its tokens split along ``seq`` as ``train`` splits them: this is the row that
shows whether the model's per-device memory, not only the attention's, falls with P.
Parameters are replicated, so their bytes (and the optimizer's, not in this step) do not
fall; ``temp_per_device`` is the activations' part. Columns:

- ``memory_per_device``: bytes XLA assigns one device for the pass (arguments, outputs,
  temporaries: ``compiled.memory_analysis()`` of the SPMD program, which is per device;
  ``argument_per_device`` is its share of q, k, v, the output cotangent and the gates);
- ``comm_per_device``: bytes one device hands to collectives in the pass, read from the
  traced program (``parallel.mesh.collective_bytes``), and for the ring also from its
  formula (``ring_communication_bytes``; the two agree, the tests check it). For ``lm`` these
  are the attention's collectives; the all-reduce of the parameter gradients, which XLA's
  partitioner adds after tracing, is not in the count;
- ``time``: median wall time of the pass. THE DEVICES ARE SIMULATED: all P of them share
  this machine's CPU cores, so time grows with P here and is not a speed-up figure.

The run happens in a child process started with
``XLA_FLAGS=--xla_force_host_platform_device_count=<max P>`` (the device count is fixed when
jax starts). The child runs the configuration the parent resolved (handed over as JSON in
its environment, so a preset registered by the caller reaches it too), and dies with the
parent: a killed command leaves no child measuring and appending rows behind it. Rows go to
``results/scaling/<preset>/rows.jsonl`` (a ``RowStore``: an
interrupted run keeps its finished rows and a rerun skips them); ``rows.json``, ``rows.csv``
and ``table.md`` are rebuilt from the rows with atomic writes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from efficient_attn.report import (RowStore, sweep_store, markdown_table, measured_environment, row_environment, to_mib, write_atomic,
                                   write_csv, write_json)
from efficient_attn.sweeps import cli
from efficient_attn.sweeps.workers import die_with_parent as _die_with_parent

__all__ = ["ScalingConfig", "PRESETS", "ENGINES", "run", "render", "main"]

ENGINES = ("ring", "context_gated", "lm")
MODES = ("weak", "strong")
TIME_NOTE = "simulated devices sharing 2 cores: time is not a speed-up figure"
_CHILD = "EFFICIENT_ATTN_SCALING_CHILD"  # "1" in the child that measures
_CONFIG = "EFFICIENT_ATTN_SCALING_CONFIG"  # the parent's resolved ScalingConfig, as JSON
_PARENT = "EFFICIENT_ATTN_SCALING_PARENT"  # the parent's pid


@dataclasses.dataclass(frozen=True)
class ScalingConfig:
    """One sweep: every mode x engine x device count."""

    preset: str
    per_device: int  # sequence positions per device (weak), or per device at the largest P (strong)
    devices: tuple[int, ...] = (1, 2, 4, 8)  # sizes of the seq axis
    engines: tuple[str, ...] = ENGINES
    modes: tuple[str, ...] = MODES
    batch: int = 1
    heads: int = 2
    head_dim: int = 16
    block_size: int = 1024  # the ring's per-device kernel blocks
    chunk: int = 64  # the gated engine's chunk
    lm_layers: int = 2  # the "lm" engine's model: layers, vocabulary
    lm_vocab: int = 256
    time_budget_s: float = 0.5  # timed work per row (at least 3 repeats)

    def __post_init__(self):
        for p in self.devices:
            if not isinstance(p, int) or p < 1:
                raise ValueError(f"scaling: device counts must be positive integers, got {self.devices}")
        top = max(self.devices)
        if self.per_device % 2:
            raise ValueError(f"scaling: per_device={self.per_device} must be even (zigzag: two chunks per device)")
        for mode in self.modes:
            if mode == "strong" and any((self.per_device * top) % (2 * p) for p in self.devices):
                raise ValueError(f"scaling: strong mode's length {self.per_device * top} is not divisible by 2P "
                                 f"for every P in {self.devices}")
        unknown = set(self.engines) - set(ENGINES) or set(self.modes) - set(MODES)
        if unknown:
            raise ValueError(f"scaling: unknown {sorted(unknown)}; engines are {ENGINES}, modes {MODES}")

    def length(self, mode: str, p: int) -> int:
        return self.per_device * (p if mode == "weak" else max(self.devices))


PRESETS = {
    # a check that the table is written (a minute at most): tiny lengths
    "quick": lambda: ScalingConfig("quick", per_device=32, devices=(1, 2, 4, 8), modes=("weak",), chunk=16,
                                   time_budget_s=0.2),
    # the real one (the lead's run): 1024 positions per device, both modes
    "cpu": lambda: ScalingConfig("cpu", per_device=1024, devices=(1, 2, 4, 8), heads=4, head_dim=64,
                                 time_budget_s=2.0),
}


# ------------------------------------------------------------------------------ measuring


def _lm_step(cfg: ScalingConfig, mesh, T: int):
    """(step, args): grad of a small causal LM's next-token loss over its parameters, its
    attention ring attention along "seq", tokens ``[B, T]`` split along "seq"."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec

    from efficient_attn.nn import CausalLM, LMConfig
    from efficient_attn.parallel.models import sequence_parallel

    width = cfg.heads * cfg.head_dim
    lm = LMConfig(vocab_size=cfg.lm_vocab, max_len=T, num_layers=cfg.lm_layers, emb_dim=width, num_heads=cfg.heads,
                  mlp_dim=4 * width, attention="full")
    model = sequence_parallel(CausalLM(lm, rngs=nnx.Rngs(0)), mesh, axis="seq", block_size=cfg.block_size)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tokens = jax.random.randint(jax.random.key(0), (cfg.batch, T), 0, cfg.lm_vocab)

    def step(params, rest, tokens):
        def loss(params):
            logits = nnx.merge(graphdef, params, rest, copy=True)(tokens).astype(jnp.float32)
            return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()

        return jax.grad(loss)(params)

    replicated = NamedSharding(mesh, PartitionSpec())
    args = (jax.device_put(params, replicated), jax.device_put(rest, replicated),
            jax.device_put(tokens, NamedSharding(mesh, PartitionSpec(None, "seq"))))
    return step, args


def _measure(cfg: ScalingConfig, mode: str, engine: str, p: int) -> dict:
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    from efficient_attn import measure
    from efficient_attn.parallel import collective_bytes, context_gated_linear_attention, make_mesh, ring_attention
    from efficient_attn.parallel.ring import ring_communication_bytes

    T = cfg.length(mode, p)
    B, H, D = cfg.batch, cfg.heads, cfg.head_dim
    mesh = make_mesh({"seq": p}, jax.devices()[:p])
    keys = jax.random.split(jax.random.key(0), 5)
    q, k, v, w = (jax.random.normal(key, (B, T, H, D)) for key in keys[:4])
    g = -jax.nn.softplus(jax.random.normal(keys[4], (B, T, H)))
    # every input is an argument split along the sequence (a constant would be a replicated
    # full-length copy on each device); the ring gets its input in zigzag order, as a model
    # that keeps activations in that order would (position-wise layers do not care)
    if engine == "ring":
        def attn(q, k, v, w, g):
            return ring_attention(q, k, v, mesh=mesh, causal=True, block_size=cfg.block_size, zigzag_input=True)
    else:
        def attn(q, k, v, w, g):
            return context_gated_linear_attention(q, k, v, g, mesh=mesh, chunk=cfg.chunk)

    def step(q, k, v, w, g):  # one training pass of the layer
        return jax.grad(lambda q, k, v: jnp.sum(attn(q, k, v, w, g) * w), argnums=(0, 1, 2))(q, k, v)

    put = NamedSharding(mesh, PartitionSpec(None, "seq"))
    args = tuple(jax.device_put(x, put) for x in (q, k, v, w, g))
    if engine == "lm":
        step, args = _lm_step(cfg, mesh, T)
    compiled, compile_s, jaxpr = measure.trace_and_compile(step, *args)
    memory = measure.compiled_memory(compiled)
    comm = collective_bytes(jaxpr)
    timing = measure.time_compiled(compiled, *args, budget_s=cfg.time_budget_s, compile_s=compile_s)
    formula = None
    if engine == "ring":
        sent = ring_communication_bytes(B, T // p, H, D, D, p, kv_mask=False)
        formula = sent["forward"] + sent["backward"]
    return {
        "mode": mode, "engine": engine, "devices": p, "length": T, "per_device_length": T // p,
        "batch": B, "heads": H, "head_dim": D,
        "memory_per_device": None if memory is None else memory.total_bytes,
        "argument_per_device": None if memory is None else memory.argument_bytes,
        "temp_per_device": None if memory is None else memory.temp_bytes,
        "comm_per_device": sum(comm.values()), "comm_by_kind": comm, "comm_formula": formula,
        "time_median_s": timing.median_s, "time_spread_s": timing.spread_s, "repeats": timing.repeats,
        "compile_s": compile_s, "status": "ok", "environment": row_environment(cfg.preset),
    }


def run(cfg: ScalingConfig, out: Path, *, force: bool = False, progress: bool = True) -> list[dict]:
    """Measure every row not yet in ``out``'s store (in this process: it needs max(P)
    devices), then render the tables. Returns the rows in plan order."""
    import jax

    if jax.device_count() < max(cfg.devices):
        raise RuntimeError(f"scaling: needs {max(cfg.devices)} devices, this process has {jax.device_count()}; "
                           f"run it through main(), which starts a child with simulated devices")
    store = sweep_store(Path(out) / "rows.jsonl", cfg, PRESETS, force=force)
    plan = [(m, e, p) for m in cfg.modes for e in cfg.engines for p in cfg.devices]
    for i, (mode, engine, p) in enumerate(plan):
        key = RowStore.make_key(cfg.preset, mode, engine, p, cfg.length(mode, p))
        if store.has(key) and not force:
            continue
        t0 = time.perf_counter()
        try:
            row = _measure(cfg, mode, engine, p)
        except Exception as err:  # keep the other rows; the exit status reports this one
            row = {"mode": mode, "engine": engine, "devices": p, "length": cfg.length(mode, p), "status": "error",
                   "reason": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"}
        store.add(key, row)
        if progress:
            print(f"[{i + 1}/{len(plan)}] {mode} {engine} P={p} T={row['length']}: {row['status']} "
                  f"({time.perf_counter() - t0:.1f} s)", flush=True)
    rows = [store.get(RowStore.make_key(cfg.preset, m, e, p, cfg.length(m, p))) for m, e, p in plan]
    render(cfg, rows, Path(out))
    return rows


def render(cfg: ScalingConfig, rows: Sequence[dict], out: Path) -> None:
    """rows.json, rows.csv and table.md from the stored rows (atomic writes)."""
    # where the rows were measured (rows stored before they kept it: the rows.json of their run)
    env = {**measured_environment(rows, stored=out / "rows.json"), "preset": cfg.preset,
           "config": dataclasses.asdict(cfg)}
    write_json(out / "rows.json", {"environment": env, "note": TIME_NOTE, "rows": list(rows)})
    flat = [{k: v for k, v in r.items() if k not in ("comm_by_kind", "environment")} for r in rows if r]
    write_csv(out / "rows.csv", flat)
    parts = [f"# Sequence-parallel scaling ({cfg.preset})\n",
             f"**Time: {TIME_NOTE}.** Memory and communication are per device, for one training pass "
             "(forward + backward) of one attention layer; memory from XLA's compiled memory analysis, "
             "communication from the traced program's collectives (ring: equal to its formula).\n",
             f"Batch {cfg.batch}, {cfg.heads} heads of width {cfg.head_dim}; ring = causal ring attention "
             "(zigzag, input already in zigzag order), context_gated = context-parallel gated linear attention, "
             f"lm = a whole training step (gradient over every parameter) of a {cfg.lm_layers}-layer causal LM whose "
             "attention is ring attention, tokens split along the sequence (its replicated parameters do not "
             "shrink with P: temp is the activations' part; its comm counts the attention's collectives only). jax "
             f"{env['jax']}, {env['cpu']} ({env['cpu_cores']} cores), commit {env['commit']}.\n"]
    for mode in cfg.modes:
        sub = [r for r in rows if r and r.get("mode") == mode]
        if not sub:
            continue
        what = ("sequence per device fixed: flat memory is ideal" if mode == "weak"
                else "total sequence fixed: memory falling as 1/P is ideal")
        parts.append(f"\n## {mode} scaling ({what})\n\n")
        body = []
        for r in sub:
            base = next((b for b in sub if b.get("engine") == r.get("engine") and b.get("devices") == min(cfg.devices)
                         and b.get("status") == "ok"), None)
            measured = r.get("status") == "ok" and base and base.get("memory_per_device") and r.get("memory_per_device")
            ratio = r["memory_per_device"] / base["memory_per_device"] if measured else None
            temp_ratio = (r["temp_per_device"] / base["temp_per_device"]
                          if measured and base.get("temp_per_device") and r.get("temp_per_device") else None)
            body.append([r.get("engine"), r.get("devices"), r.get("length"), r.get("per_device_length"),
                         to_mib(r.get("memory_per_device")), ratio, to_mib(r.get("temp_per_device")),
                         temp_ratio, to_mib(r.get("comm_per_device")),
                         to_mib(r.get("comm_formula")), r.get("time_median_s"),
                         r.get("status") if r.get("status") != "error" else f"error: {r.get('reason')}"])
        parts.append(markdown_table(["engine", "P", "T", "T / P", "memory / device (MiB)", "vs P=min",
                                     "temp / device (MiB)", "temp vs P=min",
                                     "comm / device (MiB)", "ring formula (MiB)", "time (s, simulated)", "status"],
                                    body))
    write_atomic(out / "table.md", "".join(parts))


# --------------------------------------------------------------------------- command line


def _config_json(cfg: ScalingConfig) -> str:
    return json.dumps(dataclasses.asdict(cfg))


def _config_from_json(text: str) -> ScalingConfig:
    fields = json.loads(text)
    return ScalingConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the flags, then run the preset in a child with max(P) simulated devices."""
    argv = list(sys.argv[1:] if argv is None else argv)
    child = os.environ.get(_CHILD) == "1"
    presets = dict(PRESETS)
    if child and os.environ.get(_PARENT):
        _die_with_parent(int(os.environ[_PARENT]))
    if child and os.environ.get(_CONFIG):  # the parent's configuration, whatever its presets held
        handed = _config_from_json(os.environ[_CONFIG])
        presets[handed.preset] = lambda: handed
    p = cli.experiment_parser("efficient-attn scaling", "Sequence-parallel scaling over simulated devices.",
                              presets=presets)
    p.add_argument("--engines", type=cli.name_list("--engines"), metavar="A,B",
                   help=f"engines to measure (default: the preset's; known: {', '.join(ENGINES)})")
    p.add_argument("--devices", type=cli.int_list("--devices", minimum=1), metavar="1,2,4",
                   help="sizes of the seq axis (default: the preset's)")
    args = cli.parse(p, argv)
    if args.variants is not None:
        p.error("--variants: this experiment measures the parallel engines, not variants; use --engines")
    if args.engines is not None:
        cli.check_choices(p, "--engines", args.engines, ENGINES, what="engine")
    cfg = presets[args.preset]()
    try:
        if args.engines is not None:
            cfg = dataclasses.replace(cfg, engines=args.engines)
        if args.devices is not None:
            cfg = dataclasses.replace(cfg, devices=args.devices)
    except ValueError as err:
        p.error(str(err))
    out = args.out or Path("results") / "scaling" / cfg.preset
    if not child:
        env = dict(os.environ, JAX_PLATFORMS="cpu",
                   **{_CHILD: "1", _CONFIG: _config_json(cfg), _PARENT: str(os.getpid())})
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                            f" --xla_force_host_platform_device_count={max(cfg.devices)}").strip()
        return subprocess.run([sys.executable, "-m", "efficient_attn.sweeps.scaling", *argv], env=env).returncode
    t0 = time.perf_counter()
    rows = run(cfg, out, force=args.force, progress=not args.no_progress)
    print(f"scaling ({cfg.preset}): {len(rows)} rows in {out} ({time.perf_counter() - t0:.0f} s); {TIME_NOTE}")
    return cli.exit_status(rows, "scaling")


if __name__ == "__main__":
    raise SystemExit(main())
