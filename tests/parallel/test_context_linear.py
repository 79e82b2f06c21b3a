"""Context-parallel linear and gated linear attention (efficient_attn/parallel/context_linear.py).

On 2, 4 and 8 simulated devices (a child process: see spmd.py) each equals its one-device
engine forward and backward, every gradient by name:

- linear attention (``ops.linear_attention``): causal and not, key padding, cross attention,
  FAVOR+ per-key log scales around 100 (exp(l) would overflow float32) (dphi_q, dphi_k, dv,
  dlog_scale);
- gated linear attention (``ops.gated_linear``): scalar and diagonal gates, key padding, an
  initial state and the final state (dq, dk, dv, dlog_decay, dstate0).

The only communication is the all-gather of the states (and gated log decays); its size is
checked against the traced program.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh

from conftest import assert_close
from efficient_attn.parallel import collective_bytes
from efficient_attn.parallel.context_linear import (
    context_gated_linear_attention,
    context_linear_attention,
    state_bytes,
)
from parallel.spmd import run_on_devices

# name: (engine, devices, T, S, causal, options)
CASES = {
    "linear-P2-causal": ("linear", 2, 32, 32, True, ""),
    "linear-P4-causal": ("linear", 4, 32, 32, True, ""),
    "linear-P8-causal": ("linear", 8, 32, 32, True, ""),
    "linear-P4-full": ("linear", 4, 32, 32, False, ""),
    "linear-P2-cross": ("linear", 2, 16, 32, False, ""),
    "favor-P4-causal": ("linear", 4, 32, 32, True, "log_scale"),
    "favor-P8-full": ("linear", 8, 32, 32, False, "log_scale"),
    "gated-P2-scalar": ("gated", 2, 32, 32, True, ""),
    "gated-P4-scalar-state": ("gated", 4, 32, 32, True, "state"),
    "gated-P8-scalar-state": ("gated", 8, 32, 32, True, "state"),
    "gated-P4-diagonal-state": ("gated", 4, 32, 32, True, "diagonal,state"),
}

SCRIPT = f"""
import sys
import jax, jax.numpy as jnp, numpy as np
from efficient_attn.ops.gated_linear import gated_linear_attention
from efficient_attn.ops.linear_attention import linear_attention
from efficient_attn.parallel import make_mesh
from efficient_attn.parallel.context_linear import context_gated_linear_attention, context_linear_attention

assert jax.device_count() == 8, jax.devices()
CASES = {CASES!r}
B, H, D = 2, 2, 8
CHUNK = 4  # several chunks per device at P = 2

def inputs(T, S):
    ks = jax.random.split(jax.random.key(T * 100 + S), 8)
    q = jax.random.normal(ks[0], (B, T, H, D))
    k = jax.random.normal(ks[1], (B, S, H, D))
    v = jax.random.normal(ks[2], (B, S, H, D))
    w = jax.random.normal(ks[3], (B, T, H, D))  # the output cotangent
    pos = np.arange(S)
    mask = jnp.asarray(np.stack([pos < S - 5, (pos >= 5) & (pos < S - 11)]))
    return ks, q, k, v, w, mask

def fwd_bwd(fn, args, names, w, w_state=None):
    def loss(*a):
        o = fn(*a)
        if isinstance(o, tuple):  # (out, final_state)
            return jnp.sum(o[0] * w) + jnp.sum(o[1] * w_state), o
        return jnp.sum(o * w), (o,)
    (_, outs), grads = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(args))), has_aux=True))(*args)
    got = dict(zip(("out", "final_state"), outs))
    got.update(zip(names, grads))
    return got

saved = {{}}
for name, (engine, P, T, S, causal, options) in CASES.items():
    ks, q, k, v, w, mask = inputs(T, S)
    mesh = make_mesh({{"seq": P}}, jax.devices()[:P])
    if engine == "linear":
        phi_q, phi_k = jax.nn.elu(q) + 1.0, jax.nn.elu(k) + 1.0
        if "log_scale" in options:  # exp(l) alone would overflow float32: the engines must rescale
            args, names = (phi_q, phi_k, v, 100.0 + 2.0 * jax.random.normal(ks[4], (B, S, H))), ("dphi_q", "dphi_k", "dv", "dlog_scale")
            kw = dict(causal=causal, kv_mask=mask, chunk_size=CHUNK)
            one = lambda a, b, c, l: linear_attention(a, b, c, k_log_scale=l, **kw)
            many = lambda a, b, c, l: context_linear_attention(a, b, c, k_log_scale=l, mesh=mesh, **kw)
        else:
            args, names = (phi_q, phi_k, v), ("dphi_q", "dphi_k", "dv")
            kw = dict(causal=causal, kv_mask=mask, eps=1e-6, chunk_size=CHUNK)
            one = lambda a, b, c: linear_attention(a, b, c, **kw)
            many = lambda a, b, c: context_linear_attention(a, b, c, mesh=mesh, **kw)
        want, got = fwd_bwd(one, args, names, w), fwd_bwd(many, args, names, w)
    else:
        shape = (B, T, H, D) if "diagonal" in options else (B, T, H)
        g = -jax.nn.softplus(jax.random.normal(ks[5], shape) - 1.0)  # decays in (0, 1)
        kw = dict(kv_mask=mask, chunk=CHUNK)
        if "state" in options:
            s0 = jax.random.normal(ks[6], (B, H, D, D))
            w_state = jax.random.normal(ks[7], (B, H, D, D))
            args, names = (q, k, v, g, s0), ("dq", "dk", "dv", "dlog_decay", "dstate0")
            one = lambda a, b, c, d, s: gated_linear_attention(a, b, c, d, initial_state=s, output_final_state=True, **kw)
            many = lambda a, b, c, d, s: context_gated_linear_attention(a, b, c, d, initial_state=s,
                                                                       output_final_state=True, mesh=mesh, **kw)
        else:
            w_state = None
            args, names = (q, k, v, g), ("dq", "dk", "dv", "dlog_decay")
            one = lambda a, b, c, d: gated_linear_attention(a, b, c, d, **kw)
            many = lambda a, b, c, d: context_gated_linear_attention(a, b, c, d, mesh=mesh, **kw)
        want, got = fwd_bwd(one, args, names, w, w_state), fwd_bwd(many, args, names, w, w_state)
    for g in got:
        saved[name + "/" + g] = np.asarray(got[g])
        saved[name + "/ref_" + g] = np.asarray(want[g])
np.savez(sys.argv[1], **saved)
"""

EXPECTED = {
    "linear": ("out", "dphi_q", "dphi_k", "dv"),
    "favor": ("out", "dphi_q", "dphi_k", "dv", "dlog_scale"),
    "gated": ("out", "dq", "dk", "dv", "dlog_decay"),
}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_on_devices(SCRIPT, devices=8, out=tmp_path_factory.mktemp("context_linear") / "cl.npz")


# One test over every case (not one per case): under pytest-xdist each worker that ran a test
# of this module would start its own child; every failing case and quantity is named.
def test_context_parallel_equals_one_device(results):
    failures = []
    for case, (_, _, _, _, _, options) in CASES.items():
        names = EXPECTED[case.split("-")[0]] + (("final_state", "dstate0") if "state" in options else ())
        stored = {key.split("/", 1)[1] for key in results if key.startswith(case + "/")}
        assert stored == set(names) | {"ref_" + n for n in names}, f"{case}: compared {sorted(stored)}"
        for name in names:
            got, want = results[f"{case}/{name}"], results[f"{case}/ref_{name}"]
            try:
                assert np.all(np.isfinite(got)), f"{case}: {name} is not finite"
                assert np.abs(want).max() > 1e-2, f"{case}: {name} is about zero (nothing tested)"
                assert_close(f"{case}: {name}", got, want, rtol=2e-5, atol=4e-6)
            except AssertionError as err:
                failures.append(str(err).strip().splitlines()[0] + f" (max |diff| {np.abs(got - want).max():.3g})")
    assert not failures, "\n".join(failures)
    # linear attention: row 1 has keys 5.. only, so causal queries 0..4 see none
    for case in ("linear-P2-causal", "linear-P8-causal", "favor-P4-causal"):
        out = results[f"{case}/out"][1, :5]
        assert np.array_equal(out, np.zeros_like(out)), f"{case}: rows without keys are not zeros"


@pytest.mark.parametrize("gated, diagonal", [(False, False), (True, False), (True, True)])
def test_the_only_communication_is_the_all_gather_of_the_states(gated, diagonal):
    P, B, T, H, D = 4, 2, 16, 2, 8
    mesh = AbstractMesh((P,), ("seq",))  # traced, not run
    x = jnp.zeros((B, T, H, D))
    if gated:
        g = jnp.zeros((B, T, H, D) if diagonal else (B, T, H))
        jaxpr = jax.make_jaxpr(lambda q, k, v: context_gated_linear_attention(q, k, v, g, mesh=mesh))(x, x, x)
    else:
        jaxpr = jax.make_jaxpr(lambda q, k, v: context_linear_attention(q, k, v, mesh=mesh, causal=True))(x, x, x)
    sent = collective_bytes(jaxpr)
    assert set(sent) == {"all_gather"}
    assert sent["all_gather"] == state_bytes(B, H, D, D, gated=gated, diagonal=diagonal)
