"""Training on a 2-D mesh (data=2, seq=4 of 8 simulated devices) equals training on one device.

A tiny causal LM is trained a few steps with ``train.train_step`` twice from the same
initialisation: on one device, and with ``sequence_parallel(model, mesh, batch_axis="data")``
on the mesh, the batch split over "data" and every attention core run along "seq". Checked
for an exact core (``full`` -> ring attention) and for a variant that declares its engines
(a decaying recurrence on the gated engine, registered in the child: the context-parallel
engines replace the one-device ones). Losses of every step and the trained parameters agree;
the compiled step really communicates along the ring / gathers states.

Also here (one device, no child): which cores have a sequence-parallel form, and the refusals.
"""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

from conftest import assert_close
from efficient_attn.nn import CausalLM, LMConfig
from efficient_attn.parallel import make_mesh
from efficient_attn.parallel.models import has_sequence_parallel_form, sequence_parallel
from efficient_attn.parallel.ring import RingAttention
from parallel.spmd import run_on_devices

SCRIPT = """
import dataclasses, sys
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
import efficient_attn as ea
from efficient_attn.nn import CausalLM, LMConfig
from efficient_attn.parallel import make_mesh
from efficient_attn.parallel.models import ONE_DEVICE, sequence_parallel
from efficient_attn.tasks.base import IGNORE
from efficient_attn.train import Batch, TrainConfig, make_optimizer, train_step

assert jax.device_count() == 8


@dataclasses.dataclass(frozen=True)
class DecayConfig:
    chunk_size: int = 4


@ea.register("test_decay", config=DecayConfig, family="plugin", citation="a test recurrence")
class Decay(ea.Attention):
    \"\"\"S_t = 0.9 S_{t-1} + k_t v_t^T on the gated engine, written in the engine protocol.\"\"\"

    capabilities = ea.Capabilities(causal=True, bidirectional=False, kv_mask=True, time="O(N)", memory="O(N)")

    def attend(self, q, k, v, mask):
        return self.attend_with(q, k, v, mask, ONE_DEVICE)

    def attend_with(self, q, k, v, mask, engines):
        g = jnp.full(q.shape[:3], jnp.log(0.9), jnp.float32)
        return engines.gated_linear_attention(q, k, v, g, kv_mask=mask.kv_mask, chunk=self.config.chunk_size)


B, L, V, STEPS = 4, 32, 13, 4
rng = np.random.default_rng(0)
tokens = rng.integers(1, V, (STEPS, B, L)).astype(np.int32)
lengths = rng.integers(L // 2, L + 1, (STEPS, B))
mask = np.arange(L)[None, None] < lengths[..., None]
targets = np.where(mask, np.roll(tokens, -1, axis=-1), IGNORE).astype(np.int32)
targets[..., -1] = IGNORE
cfg = TrainConfig(lr=3e-3, warmup=1, steps=STEPS, batch_size=B)
tx = make_optimizer(cfg)


def run(attention, mesh):
    lm = LMConfig(vocab_size=V, max_len=L, num_layers=2, emb_dim=16, num_heads=2, mlp_dim=32, attention=attention)
    model = CausalLM(lm, rngs=nnx.Rngs(0))
    if mesh is not None:
        model = sequence_parallel(model, mesh, axis="seq", batch_axis="data")
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    opt_state = tx.init(params)
    step_fn = jax.jit(lambda p, r, o, s, b: train_step(p, r, o, s, b, graphdef=graphdef, tx=tx, kind="token",
                                                       use_mask=True, dropout_seed=None))
    put_batch = put_all = lambda x: x
    if mesh is not None:
        put_batch = lambda x: jax.device_put(x, NamedSharding(mesh, P("data")))
        put_all = lambda x: jax.device_put(x, NamedSharding(mesh, P()))
        params, rest, opt_state = put_all(params), put_all(rest), put_all(opt_state)
    losses, text = [], ""
    for s in range(STEPS):
        batch = put_batch(Batch(tokens[s], mask[s], targets[s], np.ones(B, np.float32)))
        if s == 0:
            text = step_fn.lower(params, rest, opt_state, s, batch).as_text()
        params, rest, opt_state, loss = step_fn(params, rest, opt_state, s, batch)
        losses.append(float(loss))
    flat = {jax.tree_util.keystr(k): np.asarray(x) for k, x in jax.tree_util.tree_leaves_with_path(params)}
    return np.array(losses), flat, text


mesh = make_mesh("data=2,seq=4")
saved = {}
for attention, collective in (("full", "collective_permute"), ("test_decay", "all_gather")):
    one, one_params, _ = run(attention, None)
    two, two_params, text = run(attention, mesh)
    saved[attention + "/loss_one"], saved[attention + "/loss_mesh"] = one, two
    saved[attention + "/communicates"] = np.array(collective in text)
    for name in one_params:
        saved[attention + "/one" + name] = one_params[name]
        saved[attention + "/mesh" + name] = two_params[name]
np.savez(sys.argv[1], **saved)
"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return run_on_devices(SCRIPT, devices=8, out=tmp_path_factory.mktemp("training") / "train.npz")


# One test for both models (not one each): under pytest-xdist each worker that ran a test of
# this module would start its own child.
def test_training_on_a_data_seq_mesh_equals_one_device(trained):
    for attention in ("full", "test_decay"):
        _check_training(trained, attention)


def _check_training(trained, attention):
    assert bool(trained[f"{attention}/communicates"]), f"{attention}: the compiled step has no collective"
    one, mesh = trained[f"{attention}/loss_one"], trained[f"{attention}/loss_mesh"]
    assert len(one) == 4 and np.all(np.isfinite(one))
    assert one[-1] < one[0], f"{attention}: the loss did not fall ({one})"  # it trains at all
    assert_close(f"{attention}: loss per step", mesh, one, rtol=1e-4, atol=1e-5)
    names = [k[len(attention) + 4:] for k in trained if k.startswith(attention + "/one")]
    assert len(names) >= 15
    compared = 0
    for name in names:
        if attention == "full" and "'key'" in name and "'bias'" in name:
            # softmax ignores the key bias: its gradient is rounding noise, which Adam (eps 1e-9)
            # turns into full-size steps of random sign (as in tests/test_sharding.py)
            continue
        assert_close(f"{attention}: {name}", trained[f"{attention}/mesh{name}"], trained[f"{attention}/one{name}"],
                     rtol=1e-3, atol=2e-5)
        compared += 1
    assert compared >= 15


# -------------------------------------------------------------------- one device, no child


def _lm(attention: str) -> CausalLM:
    cfg = LMConfig(vocab_size=7, max_len=16, num_layers=1, emb_dim=8, num_heads=2, mlp_dim=16, attention=attention)
    return CausalLM(cfg, rngs=nnx.Rngs(0))


def test_exact_cores_become_rings_and_the_fast_twin_goes():
    model = sequence_parallel(_lm("full"), make_mesh("seq=1"))
    attn = model.trunk.blocks[0].attn
    assert isinstance(attn.core, RingAttention) and attn.fast_core is None


def test_a_variant_without_a_form_is_refused_naming_those_with_one():
    model = _lm("linear")
    assert not has_sequence_parallel_form(model.trunk.blocks[0].attn.core)
    with pytest.raises(ValueError, match=r"'linear' has no sequence-parallel form.*Variants with a form: .*full"):
        sequence_parallel(model, make_mesh("seq=1"))
    assert type(model.trunk.blocks[0].attn.core).__name__ == "LinearAttention"  # nothing was changed


def test_a_mesh_axis_that_does_not_exist_is_refused():
    with pytest.raises(ValueError, match=r"mesh axis 'seq' does not exist; this mesh has axes data=1"):
        sequence_parallel(_lm("full"), make_mesh("data=1"))
    with pytest.raises(ValueError, match=r"mesh axis 'batch' does not exist"):
        sequence_parallel(_lm("full"), make_mesh("seq=1"), batch_axis="batch")


def test_parallelising_twice_and_models_without_attention_are_refused():
    model = sequence_parallel(_lm("full"), make_mesh("seq=1"))
    with pytest.raises(ValueError, match="already sequence-parallel"):
        sequence_parallel(model, make_mesh("seq=1"))
    with pytest.raises(ValueError, match="no MultiHeadAttention"):
        sequence_parallel(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), make_mesh("seq=1"))
