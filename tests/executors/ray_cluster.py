"""A real Ray cluster for the executor tests: ``ray start --head`` on 127.0.0.1 with 2 CPUs, reached
by its address as a user reaches an existing cluster, and stopped at the end of the session."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"

# Ray's token authentication with a token of this session, for head, workers and this process alike
# (nothing read from or written to ~/.ray). Set at import, before any test module imports Ray: its
# core reads the token when it loads.
os.environ["RAY_AUTH_MODE"] = "token"
os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_address():
    """The address of a 2-CPU Ray head started for this session (its workers import this src)."""
    ray = pytest.importorskip("ray")
    port = _free_port()
    # a short temp dir: Ray's unix sockets live under it, and their paths must stay under 108 bytes
    temp = Path(tempfile.mkdtemp(prefix="fc-ray-"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "TQDM_DISABLE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--port", str(port),
           "--node-ip-address", "127.0.0.1", "--num-cpus", "2", "--num-gpus", "0", "--include-dashboard=false",
           "--temp-dir", str(temp), "--disable-usage-stats"]
    # --block: the head lives as long as this process, and SIGTERM to it stops every process it started
    head = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.time() + 300  # a loaded 2-core machine can take minutes to bring a head up
        while True:
            probe = subprocess.run([sys.executable, "-c", f"import ray; ray.init(address='{address}'); ray.shutdown()"],
                                   env=env, capture_output=True, timeout=120)
            if probe.returncode == 0:
                break
            if head.poll() is not None or time.time() > deadline:
                pytest.fail(f"ray head did not start: {probe.stderr.decode()[-500:]}")
            time.sleep(1)
        yield address
    finally:
        if ray.is_initialized():
            ray.shutdown()
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
        subprocess.run(["rm", "-rf", str(temp)], check=False)
