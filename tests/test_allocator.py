"""efficient_attn.allocator: the glibc tunables, the re-exec, and that they stop the page faults."""

import os
import subprocess
import sys
import textwrap

import pytest

from efficient_attn import allocator

needs_glibc = pytest.mark.skipif(not allocator.supported(), reason="needs Linux with glibc >= 2.35")


def _clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", allocator.OPT_OUT)}
    env.update(extra)
    return env


def test_tuned_environment_adds_the_tunables_and_keeps_the_others():
    env = allocator.tuned_environment({"GLIBC_TUNABLES": "glibc.malloc.tcache_count=0:glibc.malloc.hugetlb=0",
                                       "OTHER": "x"})
    parts = env["GLIBC_TUNABLES"].split(":")
    assert "glibc.malloc.tcache_count=0" in parts and env["OTHER"] == "x"
    assert "glibc.malloc.hugetlb=0" not in parts  # a conflicting value is replaced, not duplicated
    assert set(allocator.TUNABLES) <= set(parts) and allocator.is_tuned(env)
    assert not allocator.is_tuned({}) and not allocator.is_tuned({"GLIBC_TUNABLES": allocator.TUNABLES[0]})


def test_describe_names_the_setting():
    assert "hugetlb=1" in allocator.describe(allocator.tuned_environment({}))
    assert allocator.OPT_OUT in allocator.describe({allocator.OPT_OUT: "1"})
    assert "defaults" in allocator.describe({})


PROBE = textwrap.dedent(
    """
    import os, sys
    from efficient_attn.allocator import reexec_with_tuned_allocator
    print("start", flush=True)
    reexec_with_tuned_allocator()
    print("tunables:", os.environ.get("GLIBC_TUNABLES", ""), "argv:", sys.argv[1:])
    """
)


@needs_glibc
def test_a_command_line_re_executes_itself_with_the_tunables(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    out = subprocess.run([sys.executable, str(script), "--flag", "v"], env=_clean_env(), capture_output=True,
                         text=True, timeout=120, check=True).stdout
    assert out.count("start") == 2  # once before the re-exec, once after; then it does not loop
    assert all(t in out for t in allocator.TUNABLES) and "argv: ['--flag', 'v']" in out


@needs_glibc
def test_the_opt_out_keeps_the_system_defaults(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    out = subprocess.run([sys.executable, str(script)], env=_clean_env(**{allocator.OPT_OUT: "1"}),
                         capture_output=True, text=True, timeout=120, check=True).stdout
    assert out.count("start") == 1 and "tunables:  argv: []" in out  # not re-executed, nothing set


FAULTS = textwrap.dedent(
    """
    import resource, jax, jax.numpy as jnp
    x = jnp.ones((8 * 2**20,), jnp.float32)  # 32 MiB
    f = jax.jit(lambda x: x * 1.5 + 1.0)
    jax.block_until_ready(f(x))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        y = f(x); jax.block_until_ready(y); del y
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
    """
)


@needs_glibc
def test_the_tunables_stop_the_per_call_page_faults(tmp_path):
    """A real property of this machine's runtime: under glibc's defaults every call faults in
    each 4 KiB page of a 32 MiB output again (8192 pages); tuned, the buffer is reused."""
    script = tmp_path / "faults.py"
    script.write_text(FAULTS)

    def faults(env):
        out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                             timeout=300, check=True).stdout
        return float(out.strip().splitlines()[-1])

    default = faults(_clean_env(JAX_PLATFORMS="cpu"))
    tuned = faults(allocator.tuned_environment(_clean_env(JAX_PLATFORMS="cpu")))
    pages = 8 * 2**20 * 4 // 4096
    assert default > 0.5 * pages, f"expected the default allocator to fault most pages, got {default}"
    assert tuned < 0.05 * pages, f"tuned allocator still faults {tuned} pages per call (of {pages})"
