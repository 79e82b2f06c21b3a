"""Training on a 2-D mesh (data=2, seq=4 of 8 simulated devices) equals training on one device.

A tiny causal LM is trained a few steps with ``train.train_step`` twice from the same
initialisation: on one device, and with ``sequence_parallel(model, mesh, batch_axis="data")``
on the mesh, the batch split over "data" and every attention core run along "seq". Checked
for an exact core (``full`` -> ring attention) and for a variant that declares its engines
(a decaying recurrence on the gated engine, registered in the child: the context-parallel
engines replace the one-device ones). Losses of every step and the trained parameters agree;
the compiled step really communicates along the ring / gathers states.

In the same child (one process start for the module), the whole loop: ``train()`` with
``TrainConfig(mesh="data=2,seq=4")`` on a tiny MQAR task (a causal LM scored at few
positions) against ``TrainConfig(mesh="data=8")``, the reference: every device holds whole
sequences, as on one device, so the attention is not split (``mesh=None`` is the same split
over all 8 devices; one device proper is the ``train_step`` comparison above and
tests/test_sharding.py). Every validation of the history, the test metrics and the final
parameters agree.

Also here (one device, no child): which cores have a sequence-parallel form; the refusals of
``sequence_parallel``, of ``TrainConfig.mesh`` and ``train`` (checked before any device is
needed), and of the accuracy experiment's ``--mesh``; a mesh run's rows are rows of their own
while the committed rows keep their fingerprints.
"""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

import argparse
import dataclasses
import hashlib
import importlib
import json
from pathlib import Path

from conftest import TEST_XLA_FLAGS, assert_close
from efficient_attn import tasks
from efficient_attn.nn import CausalLM, Classifier, EncoderConfig, LMConfig
from efficient_attn.parallel import make_mesh
from efficient_attn.parallel.models import has_sequence_parallel_form, sequence_parallel
from efficient_attn.parallel.ring import RingAttention
from efficient_attn.sweeps import accuracy as acc
from efficient_attn.train import TrainConfig, train
from parallel.spmd import ROOT, run_on_devices

acc_run = importlib.import_module("efficient_attn.sweeps.accuracy.run")
acc_cli = importlib.import_module("efficient_attn.sweeps.accuracy.cli")

SCRIPT = """
import os
if not os.environ.get("EA_TEST_FULL_OPT"):  # the suite's compile setting (conftest), which the child's
    os.environ["XLA_FLAGS"] += " " + @TEST_FLAGS@  # XLA_FLAGS (a device count) replaced
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

# the whole loop, train(): the batch on P("data"), the cores made sequence-parallel inside
from efficient_attn import tasks
from efficient_attn.train import train

data = tasks.generate("mqar", seq_len=32, num_train=16, num_val=8, num_test=8, seed=0, vocab_size=16, num_pairs=2)
for spec in ("data=8", "data=2,seq=4"):
    lm = LMConfig(vocab_size=16, max_len=32, num_layers=1, emb_dim=16, num_heads=2, mlp_dim=32, attention="full")
    model = CausalLM(lm, rngs=nnx.Rngs(1))
    res = train(model, data, TrainConfig(lr=3e-3, warmup=1, steps=4, batch_size=8, eval_every=2, mesh=spec),
                progress=False)
    saved[f"train/{spec}/cores"] = np.array([type(b.attn.core).__name__ for b in res.model.trunk.blocks])
    saved[f"train/{spec}/caller"] = np.array(type(model.trunk.blocks[0].attn.core).__name__)
    for field in ("step", "train_loss", "val_loss", "val_accuracy"):
        saved[f"train/{spec}/{field}"] = np.array([h[field] for h in res.history])
    saved[f"train/{spec}/test"] = np.array([res.test, res.test_loss, res.best_step])
    for k, x in jax.tree_util.tree_leaves_with_path(res.params):
        saved[f"train/{spec}/param" + jax.tree_util.keystr(k)] = np.asarray(x)
np.savez(sys.argv[1], **saved)
""".replace("@TEST_FLAGS@", repr(TEST_XLA_FLAGS))


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


def test_train_on_a_data_seq_mesh_equals_the_unsplit_sequence(trained):
    ref, sp = "train/data=8", "train/data=2,seq=4"
    assert list(trained[f"{sp}/cores"]) == ["RingAttention"] and list(trained[f"{ref}/cores"]) != ["RingAttention"]
    assert str(trained[f"{sp}/caller"]) != "RingAttention"  # train() parallelised a copy, not the caller's model
    assert list(trained[f"{ref}/step"]) == list(trained[f"{sp}/step"]) == [2, 4]
    for field in ("train_loss", "val_loss", "val_accuracy"):
        assert_close(f"train(): history {field}", trained[f"{sp}/{field}"], trained[f"{ref}/{field}"],
                     rtol=1e-4, atol=1e-6)
    assert_close("train(): test metric, test loss, best step", trained[f"{sp}/test"], trained[f"{ref}/test"],
                 rtol=1e-4, atol=1e-6)
    names = [k[len(ref) + 6:] for k in trained if k.startswith(f"{ref}/param")]
    assert len(names) >= 10
    for name in names:
        if "'key'" in name and "'bias'" in name:
            continue  # softmax ignores the key bias: its Adam steps are rounding noise (as above)
        assert_close(f"train(): {name}", trained[f"{sp}/param{name}"], trained[f"{ref}/param{name}"],
                     rtol=1e-3, atol=2e-5)


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


# ------------------------------------------ train() and the experiments on a mesh: refusals


def _mqar():
    return tasks.generate("mqar", seq_len=32, num_train=16, num_val=8, num_test=8, seed=0, vocab_size=16, num_pairs=2)


def _mqar_lm(attention: str) -> CausalLM:
    cfg = LMConfig(vocab_size=16, max_len=32, num_layers=1, emb_dim=8, num_heads=2, mlp_dim=16, attention=attention)
    return CausalLM(cfg, rngs=nnx.Rngs(0))


def test_train_config_mesh_is_checked_and_spelled_one_way():
    cfg = TrainConfig(batch_size=8, mesh=" data=2 , seq=4")
    assert cfg.mesh == "data=2,seq=4" and cfg.mesh_sizes() == {"data": 2, "seq": 4}
    assert cfg.record()["mesh"] == "data=2,seq=4" and "mesh" not in TrainConfig().record()
    with pytest.raises(ValueError, match=r"TrainConfig: mesh: axis 'model' .* name only 'data' and 'seq'"):
        TrainConfig(mesh="data=2,model=4")
    with pytest.raises(ValueError, match=r"TrainConfig: mesh: .*not axis=size"):
        TrainConfig(mesh="data2")
    with pytest.raises(ValueError, match=r"batch_size=6 must be divisible by the size of the mesh's 'data' axis \(4"):
        TrainConfig(batch_size=6, mesh="data=4")
    with pytest.raises(ValueError, match=r"eval_batch_size=6 must be divisible .*'data' axis \(4"):
        TrainConfig(batch_size=8, eval_batch_size=6, mesh="data=4")


def test_train_refuses_a_bad_mesh_before_touching_a_device():
    data = _mqar()
    cfg = TrainConfig(warmup=1, steps=2, batch_size=8)
    # 32 positions on 3 "seq" devices: refused with the fix, although this process has 1 device
    with pytest.raises(ValueError, match=r"sequence length = 32 is not divisible by 3 .*pad the sequence to 33"):
        train(_mqar_lm("full"), data, dataclasses.replace(cfg, mesh="seq=3"), progress=False)
    # a classifier's CLS token is a position of the attention: 16 tokens + 1 on 2 devices
    toy = tasks.generate("listops", seq_len=16, num_train=8, num_val=8, num_test=8, seed=0)
    enc = Classifier(EncoderConfig(vocab_size=toy.vocab_size, max_len=16, num_classes=toy.num_classes, num_layers=1,
                                   emb_dim=8, num_heads=2, mlp_dim=16), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"16 tokens \+ 1 position.*pool='mean'.* = 17 is not divisible by 2"):
        train(enc, toy, dataclasses.replace(cfg, mesh="data=4,seq=2"), progress=False)
    model = _mqar_lm("linear")
    with pytest.raises(ValueError, match=r"'linear' has no sequence-parallel form"):
        train(model, data, dataclasses.replace(cfg, mesh="data=2,seq=4"), progress=False)
    assert type(model.trunk.blocks[0].attn.core).__name__ == "LinearAttention"  # the caller's model is untouched
    with pytest.raises(ValueError, match=r"needs 8 devices, got 1: on a CPU, simulate 8 devices by setting "
                                         r"XLA_FLAGS=--xla_force_host_platform_device_count=8"):
        train(_mqar_lm("full"), data, dataclasses.replace(cfg, mesh="data=2,seq=4"), progress=False)


@pytest.mark.parametrize("argv, needles", [
    (["--mesh", "data=2,tensor=2"], ["--mesh: axis 'tensor'", "'data' and 'seq'"]),
    (["--mesh", "data=2,seq=4"], ["--mesh data=2,seq=4: needs 8 devices, this process has 1",
                                  "XLA_FLAGS=--xla_force_host_platform_device_count=8"]),
])
def test_accuracy_mesh_flag_is_refused_in_one_line(capsys, argv, needles):
    with pytest.raises(SystemExit) as exc:
        acc.parse_args(["--preset", "quick"] + argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("efficient-attn train: error: --mesh")
    for needle in needles:
        assert needle in err, err


def test_accuracy_mesh_runs_are_rows_of_their_own_and_old_rows_keep_their_fingerprints():
    plain = acc.config_from_args(acc.parse_args(["--preset", "quick"]))
    meshed = acc.config_from_args(acc.parse_args(["--preset", "quick", "--mesh", "data=1"]))
    assert all(t.train.mesh is None for t in plain.tasks) and all(t.train.mesh == "data=1" for t in meshed.tasks)
    assert acc_cli.default_out(plain) == Path("results/accuracy/quick")
    assert acc_cli.default_out(meshed) == Path("results/accuracy/quick_mesh_data1")
    by_hand = acc.config_from_args(argparse.Namespace(preset="quick", mesh="seq=1, data=1"))
    assert {t.train.mesh for t in by_hand.tasks} == {"seq=1,data=1"}
    with pytest.raises(SystemExit, match=r"--mesh data=7: TrainConfig: .*batch_size=\d+ must be divisible .*'data'"):
        acc.config_from_args(argparse.Namespace(preset="quick", mesh="data=7"))
    for t, m in zip(plain.tasks, meshed.tasks):
        # without a mesh the hash is the one rows were stored under before the field existed
        blob = dataclasses.asdict(t)
        for field, value in acc.ModelSize.ADDED_LATER:
            if blob["model"][field] == value:
                del blob["model"][field]
        del blob["train"]["mesh"]
        old = hashlib.sha256(json.dumps([blob, (), 0], sort_keys=True, default=str).encode()).hexdigest()[:12]
        assert t.fingerprint((), 0) == old != m.fingerprint((), 0)
    assert acc_run._key("full", "mqar", 0) == "full|mqar|0" != acc_run._key("full", "mqar", 0, "data=1")
    # the committed quick rows are found (resumed, not retrained) by the fingerprint code path
    path = ROOT / "results" / "accuracy" / "quick" / "rows.jsonl"
    rows = [json.loads(line)["row"] for line in path.read_text().splitlines() if line.strip()]
    assert rows and len(acc_run.rows_of(plain, rows)) > 0
    assert acc_run.rows_of(meshed, rows) == []
    # a variant without a sequence-parallel form is n/a on a seq mesh, planned from its capabilities
    seq_setting = dataclasses.replace(plain.tasks[0], train=dataclasses.replace(plain.tasks[0].train, mesh="seq=2"))
    assert acc_run.mesh_plan("full", seq_setting) == (True, "")
    ok, reason = acc_run.mesh_plan("linear", seq_setting)
    assert not ok and "no sequence-parallel form (mesh seq=2)" in reason
    assert acc_run.mesh_plan("linear", meshed.tasks[0]) == (True, "")  # no seq axis: every variant runs
