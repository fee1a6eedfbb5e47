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
