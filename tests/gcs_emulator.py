"""A real GCS JSON API on localhost for the gs:// tests: `gcp-storage-emulator` (PyPI) in a subprocess.

Clients are pointed at it by environment variables: STORAGE_EMULATOR_HOST (gcsfs, google-cloud-storage) and
TENSORSTORE_GCS_HTTP_URL (TensorStore, which Orbax writes arrays through); no credentials are needed.
"""

import contextlib
import os
import socket
import subprocess
import sys
import time

BUCKET = "jaxctx-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


class Emulator:
    def __init__(self, log_path):
        self.port = _free_port()
        self.url = f"http://localhost:{self.port}"
        # FSSPEC_GS_TOKEN=anon: gcsfs without credentials; GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false: gcsfs would
        # otherwise ask the Storage Control gRPC API (GetStorageLayout) for the bucket type on every open, which
        # the emulator does not serve (each call waits out a 60 s timeout).
        self.env = {"STORAGE_EMULATOR_HOST": self.url, "TENSORSTORE_GCS_HTTP_URL": self.url,
                    "GOOGLE_CLOUD_PROJECT": "jaxctx-test", "FSSPEC_GS_TOKEN": "anon",
                    "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "gcp_storage_emulator", "start", "--port",
                                      str(self.port), "--in-memory", "--default-bucket", BUCKET, "-q"],
                                     stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.time() + 60
        while True:
            try:
                socket.create_connection(("localhost", self.port), timeout=1).close()
                break
            except OSError:
                assert self.proc.poll() is None, open(log_path).read()
                assert time.time() < deadline, "the GCS emulator did not start"
                time.sleep(0.1)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self._log.close()


@contextlib.contextmanager
def emulated_gcs(log_path):
    """An Emulator with its variables set in os.environ (restored afterwards): gs:// reaches it from this process."""
    emulator = Emulator(log_path)
    saved = {k: os.environ.get(k) for k in emulator.env}
    os.environ.update(emulator.env)
    import fsspec.config
    fsspec.config.set_conf_env(fsspec.config.conf)  # FSSPEC_GS_TOKEN, read at fsspec import, read again
    try:
        yield emulator
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        emulator.stop()
