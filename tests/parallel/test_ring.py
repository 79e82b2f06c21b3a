"""Ring attention (efficient_attn/parallel/ring.py).

- On 2, 4 and 8 simulated devices (a child process: see spmd.py) the ring equals the
  one-device blockwise kernel forward and backward (out, dq, dk, dv by name), causal and not,
  with key padding (including queries that see no key: exact zeros), without a mask, for
  cross attention, with the batch split over a second mesh axis, grouped-query heads,
  packed segments and a logit soft cap.
- The zigzag plan: what each device computes at each step is exactly the visible pairs of
  the global positions it holds, and the work is the same on every device at every step
  (contiguous placement, for contrast, is not balanced).
- The communication formula equals the bytes the traced program hands to ppermute.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh

from conftest import assert_close
from efficient_attn.parallel import collective_bytes, ring_attention
from efficient_attn.parallel.ring import (
    placement,
    ring_communication_bytes,
    ring_plan,
    ring_work,
    visible_pairs,
    zigzag_order,
)
from parallel.spmd import run_on_devices

# name: (devices along "seq", data-axis size, T, S, causal, key padding, extras)
CASES = {
    "P2-causal-padded": (2, 1, 32, 32, True, True, ""),
    "P2-full-padded": (2, 1, 32, 32, False, True, ""),
    "P4-causal-padded": (4, 1, 32, 32, True, True, ""),
    "P4-full-padded": (4, 1, 32, 32, False, True, ""),
    "P8-causal-padded": (8, 1, 32, 32, True, True, ""),
    "P8-full-padded": (8, 1, 32, 32, False, True, ""),
    "P4-causal-unmasked": (4, 1, 32, 32, True, False, ""),
    "P4-cross-padded": (4, 1, 16, 32, False, True, ""),
    "data2-P4-causal-padded": (4, 2, 32, 32, True, True, ""),
    "P4-causal-gqa": (4, 1, 32, 32, True, True, "gqa"),
    "P8-causal-segments-softcap": (8, 1, 32, 32, True, False, "segments,softcap"),
}

SCRIPT = f"""
import sys
import jax, jax.numpy as jnp, numpy as np
from efficient_attn.ops.online_softmax import blockwise_attention
from efficient_attn.parallel import make_mesh, ring_attention

assert jax.device_count() == 8, jax.devices()
CASES = {CASES!r}
B, H, D = 2, 2, 8
BLOCKS = dict(block_size=8, backward_query_block=8)  # several kernel blocks per device at P = 2

def inputs(T, S, kv_heads):
    kq, kk, kv, kw = jax.random.split(jax.random.key(T * 100 + S), 4)
    q = jax.random.normal(kq, (B, T, H, D))
    k = jax.random.normal(kk, (B, S, kv_heads, D))
    v = jax.random.normal(kv, (B, S, kv_heads, D))
    w = jax.random.normal(kw, (B, T, H, D))  # the output cotangent
    pos = np.arange(S)
    # row 0: padded tail; row 1: keys [5, S - 11) only, so causal queries 0..4 see nothing
    mask = jnp.asarray(np.stack([pos < S - 5, (pos >= 5) & (pos < S - 11)]))
    return q, k, v, w, mask

def fwd_bwd(attn, q, k, v, w, jit=True):
    def loss(q, k, v):
        o = attn(q, k, v)
        return jnp.sum(o * w), o
    f = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)
    (_, o), grads = (jax.jit(f) if jit else f)(q, k, v)
    return dict(zip(("out", "dq", "dk", "dv"), (o,) + grads))

def segment_ids(L):  # packed rows, sorted ids: row 0 two segments, row 1 three
    pos = np.arange(L)
    return jnp.asarray(np.stack([(pos >= 12).astype(np.int32), (pos >= 5).astype(np.int32) + (pos >= 20)]))

saved, refs = {{}}, {{}}
for name, (P, data, T, S, causal, padded, extras) in CASES.items():
    q, k, v, w, mask = inputs(T, S, 1 if "gqa" in extras else H)
    opts = dict(kv_mask=mask if padded else None, **BLOCKS)
    if "segments" in extras:
        opts.update(q_segment_ids=segment_ids(T), kv_segment_ids=segment_ids(S))
    if "softcap" in extras:
        opts.update(softcap=2.0)  # logits of these inputs reach about 3: the cap bends them
    key = (T, S, causal, padded, extras)
    if key not in refs:
        # blockwise_attention checks softcap with jnp.isfinite, which fails under jit: eager there
        refs[key] = fwd_bwd(lambda q, k, v: blockwise_attention(q, k, v, causal=causal, **opts), q, k, v, w,
                            jit="softcap" not in extras)
    spec = {{"data": data, "seq": P}} if data > 1 else {{"seq": P}}
    mesh = make_mesh(spec, jax.devices()[: P * data])
    batch_axis = "data" if data > 1 else None
    got = fwd_bwd(lambda q, k, v: ring_attention(q, k, v, mesh=mesh, batch_axis=batch_axis, causal=causal, **opts),
                  q, k, v, w)
    for g in got:
        saved[name + "/" + g] = np.asarray(got[g])
        saved[name + "/ref_" + g] = np.asarray(refs[key][g])
np.savez(sys.argv[1], **saved)
"""


@pytest.fixture(scope="module")
def ring_results(tmp_path_factory):
    return run_on_devices(SCRIPT, devices=8, out=tmp_path_factory.mktemp("ring") / "ring.npz")


# One test over every case (not one per case): under pytest-xdist each worker that ran a test
# of this module would start its own child; every failing case and quantity is named.
def test_ring_equals_blockwise_forward_and_backward(ring_results):
    failures = []
    for case in CASES:
        for name in ("out", "dq", "dk", "dv"):
            got, want = ring_results[f"{case}/{name}"], ring_results[f"{case}/ref_{name}"]
            try:
                assert np.all(np.isfinite(got)), f"{case}: {name} is not finite"
                assert_close(f"{case}: {name}", got, want, rtol=1e-5, atol=2e-6)
            except AssertionError as err:
                failures.append(str(err).strip().splitlines()[0] + f" (max |diff| {np.abs(got - want).max():.3g})")
    assert not failures, "\n".join(failures)
    # row 1 of the padded cases has keys 5.. only: causal queries 0..4 see none -> exact zeros
    for case, (_, _, _, _, causal, padded, _) in CASES.items():
        if causal and padded:
            out = ring_results[f"{case}/out"][1, :5]
            assert np.array_equal(out, np.zeros_like(out)), f"{case}: rows without keys are not zeros"
            assert np.abs(ring_results[f"{case}/out"][1, 5:]).max() > 0


# ------------------------------------------------------------------------------- the plan


@pytest.mark.parametrize("devices", [2, 4, 8])
def test_zigzag_placement_is_a_permutation_with_sorted_shards(devices):
    T = 4 * devices
    pos = placement(T, devices, "zigzag")
    assert sorted(pos.ravel().tolist()) == list(range(T))
    assert all(np.all(np.diff(row) > 0) for row in pos)  # local order = position order: local causal mask is right
    np.testing.assert_array_equal(zigzag_order(T, devices), pos.ravel())


@pytest.mark.parametrize("devices", [2, 4, 8])
@pytest.mark.parametrize("causal", [True, False])
def test_the_plan_computes_exactly_the_visible_pairs(devices, causal):
    n = 6  # local length: chunks of 3
    pos = placement(n * devices, devices, "zigzag" if causal else "contiguous")
    plan = ring_plan(devices, n, causal)
    for i in range(devices):
        for s in range(devices):
            rows, cols, local_causal = plan[i][s]
            computed = np.zeros((n, n), bool)
            computed[rows, cols] = True
            if local_causal:
                computed &= np.tril(np.ones((n, n), bool))
            np.testing.assert_array_equal(computed, visible_pairs(pos, i, s, causal),
                                          err_msg=f"device {i} step {s}")


@pytest.mark.parametrize("devices", [2, 4, 8])
def test_zigzag_work_is_equal_on_every_device_at_every_step(devices):
    n = 8
    work = ring_work(devices, n, causal=True)  # [device, step]
    assert np.all(work == work[0]), work
    # steps >= 1 hand the kernel half a block (2c x c); step 0 a local causal block
    assert np.all(work[:, 1:] == n * n // 2) and work[0, 0] == n * (n + 1) // 2
    # all together, exactly the visible pairs of causal attention over n P positions
    N = n * devices
    assert work.sum() == N * (N + 1) // 2
    # contrast: contiguous placement gives device 0 one block of work and device P - 1 all P
    pos = placement(N, devices, "contiguous")
    per_device = [sum(int(visible_pairs(pos, i, s, True).sum()) for s in range(devices)) for i in range(devices)]
    assert per_device[0] < per_device[-1]


@pytest.mark.parametrize("devices", [2, 8])
@pytest.mark.parametrize("padded, segments, kv_heads", [(True, False, 2), (False, False, 1), (False, True, 2)])
def test_communication_formula_equals_the_program(devices, padded, segments, kv_heads):
    mesh = AbstractMesh((devices,), ("seq",))  # traced, not run: no devices needed
    B, H, D, n = 2, 2, 8, 4
    x = jnp.zeros((B, n * devices, H, D))
    kv = jnp.zeros((B, n * devices, kv_heads, D))
    mask = jnp.ones((B, n * devices), bool) if padded else None
    ids = jnp.zeros((B, n * devices), jnp.int32) if segments else None

    def f(q, k, v):
        return ring_attention(q, k, v, mesh=mesh, causal=True, kv_mask=mask, q_segment_ids=ids, kv_segment_ids=ids)

    forward = collective_bytes(jax.make_jaxpr(f)(x, kv, kv))
    both = collective_bytes(jax.make_jaxpr(jax.grad(lambda q, k, v: jnp.sum(f(q, k, v)), argnums=(0, 1, 2)))(x, kv, kv))
    want = ring_communication_bytes(B, n, kv_heads, D, D, devices, kv_mask=padded, segments=segments)
    assert forward == {"ppermute": want["forward"]}
    assert both == {"ppermute": want["forward"] + want["backward"]}
