"""Ring attention across processes: 2 processes x 2 CPU devices, ``jax.distributed`` on
127.0.0.1 (loopback only) with JAX's CPU collectives (gloo).

Each process builds the same global q, k, v (same seed), puts its own shards on its two
devices (``jax.make_array_from_callback``), runs ring attention forward and backward over the
4-device ``seq`` axis, gathers the results (``process_allgather``) and computes the one-device
blockwise kernel on its own first device. Both processes must agree with the kernel, causal
(zigzag) and not, with key padding (out, dq, dk, dv by name).
"""

from __future__ import annotations

import itertools
import socket
import subprocess
import sys

import numpy as np
import pytest

from conftest import assert_close
from parallel.spmd import ROOT, child_env

WORKER = """
import sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
port, pid, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid,
                           initialization_timeout=120)
import jax.numpy as jnp, numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
from efficient_attn.ops.online_softmax import blockwise_attention
from efficient_attn.parallel import make_mesh, ring_attention

assert (jax.process_count(), jax.device_count(), jax.local_device_count()) == (2, 4, 2)
mesh = make_mesh("seq=4")  # jax.devices(): every process's devices, in process order
B, T, H, D = 2, 32, 2, 8
r = np.random.default_rng(0)
q, k, v, w = (r.standard_normal((B, T, H, D)).astype(np.float32) for _ in range(4))
pos = np.arange(T)
mask = np.stack([pos < T - 5, (pos >= 5) & (pos < T - 11)])


def global_array(x):  # each process supplies the shards of its own devices
    sharding = NamedSharding(mesh, P(None, "seq"))
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def fwd_bwd(attn, *args):
    def loss(q, k, v, w, mask):
        o = attn(q, k, v, mask)
        return jnp.sum(o * w), o
    (_, o), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(*args)
    return dict(zip(("out", "dq", "dk", "dv"), (o,) + grads))


saved = {}
here = jax.local_devices()[0]
for causal in (False, True):
    ring = fwd_bwd(lambda q, k, v, m: ring_attention(q, k, v, mesh=mesh, causal=causal, kv_mask=m, block_size=8,
                                                     backward_query_block=8),
                   *(global_array(x) for x in (q, k, v, w, mask)))
    ref = fwd_bwd(lambda q, k, v, m: blockwise_attention(q, k, v, causal=causal, kv_mask=m, block_size=8,
                                                         backward_query_block=8),
                  *(jax.device_put(x, here) for x in (q, k, v, w, mask)))
    for name in ring:
        saved[f"causal={causal}/{name}"] = np.asarray(multihost_utils.process_allgather(ring[name], tiled=True))
        saved[f"causal={causal}/ref_{name}"] = np.asarray(ref[name])
np.savez(out, **saved)
jax.distributed.shutdown()
"""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multiprocess")
    port = _free_port()
    outs = [tmp / f"process{i}.npz" for i in range(2)]
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(port), str(i), str(outs[i])], env=child_env(2),
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    errors = []
    for i, proc in enumerate(procs):
        try:
            _, err = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        if proc.returncode:
            errors.append(f"process {i} exit {proc.returncode}:\n{err[-3000:]}")
    assert not errors, "\n".join(errors)
    results = []
    for path in outs:
        with np.load(path) as data:
            results.append({name: data[name] for name in data.files})
    return results


def test_ring_across_two_processes_equals_one_device(two_processes):
    # one test (not one per causal flag): under pytest-xdist each worker would start its own pair
    for pid, results in enumerate(two_processes):
        for causal, name in itertools.product((False, True), ("out", "dq", "dk", "dv")):
            got, want = results[f"causal={causal}/{name}"], results[f"causal={causal}/ref_{name}"]
            assert got.shape == (2, 32, 2, 8)
            assert_close(f"process {pid} causal={causal}: {name}", got, want, rtol=1e-5, atol=2e-6)
