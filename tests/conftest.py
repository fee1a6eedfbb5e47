"""Test-wide settings: 8 fake CPU devices for sharding tests, f32 matmuls at full precision."""

import os

# Must be set before jax initialises its backends; harmless for tests that use one device. Appended to a user's
# own XLA_FLAGS rather than skipped when they are set (XLA takes the last occurrence of a repeated flag).
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8".strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_collection_modifyitems(config, items):
    backend = jax.default_backend()
    for item in items:
        # Markers, not item.keywords: keywords also hold directory names, and tests/tpu (the launch kit, offline)
        # needs no TPU.
        if item.get_closest_marker("gpu") and backend != "gpu":
            item.add_marker(pytest.mark.skip(reason="needs a GPU"))
        if item.get_closest_marker("tpu") and backend != "tpu":
            item.add_marker(pytest.mark.skip(reason="needs a TPU"))


@pytest.fixture(scope="module")
def compilation_cache(tmp_path_factory):
    """A persistent compilation cache for one module (opt in with `pytestmark =
    pytest.mark.usefixtures("compilation_cache")`): modules that train the same tiny config many times compile its
    step once and load it afterwards (~3 s instead of ~20 s a run on 2 cores). The cached executable is the same
    code, so bit-for-bit comparisons are unaffected. Yields the environment variables that give a subprocess the
    same cache. Reset afterwards, so later modules run uncached, as they would alone."""
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    old = {name: getattr(jax.config, name) for name in names}
    cache_dir = str(tmp_path_factory.mktemp("jax_cache"))
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    yield {"JAX_COMPILATION_CACHE_DIR": cache_dir, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    for name, value in old.items():
        jax.config.update(name, value)
    try:
        from jax._src import compilation_cache as jax_cache
        jax_cache.reset_cache()
    except (ImportError, AttributeError):
        pass
