"""`brq-serve`: the one `vllm serve` command line for a BRQ checkpoint.

Images (docker/), Compose (deploy/compose), Kubernetes manifests (deploy/k8s) and the CI
server test all start the server through this command, so the arguments exist once:

    brq-serve MODEL [--host H] [--port P] [--print] [EXTRA VLLM ARGS...]

becomes (and is exec'd, replacing this process, so signals reach vLLM directly)

    vllm serve MODEL --quantization brq --host H --port P [EXTRA VLLM ARGS...]

- MODEL is the first positional argument (before any pass-through one), or `--model PATH`, or the environment's BRQ_MODEL.
- --host / --port default to BRQ_HOST (0.0.0.0) and BRQ_PORT (8000).
- Everything else is passed to `vllm serve` unchanged (e.g. --tensor-parallel-size 8,
  --max-model-len 8192, --enforce-eager, --served-model-name NAME), followed by the
  shell-split words of BRQ_EXTRA_ARGS (handy in Compose .env files).
- API key: vLLM reads VLLM_API_KEY from the environment itself, so the key is kept there
  and never put on the command line (where `ps` and /proc/PID/cmdline would show it).
  VLLM_API_KEY_FILE (or --api-key-file) names a file holding the key (a Kubernetes or
  Compose secret mounted as a file); it is read into VLLM_API_KEY before the exec.
- --print (alias --dry-run) prints the command and the API-key source and exits.
- --healthcheck asks http://127.0.0.1:PORT/health of a running server (exit 0 when it
  answers 200): the HEALTHCHECK of the images and Compose, with no curl needed.
- BRQ_VLLM_CMD overrides the launcher (default "vllm"), e.g. "python3 -m vllm.entrypoints.cli.main".
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path

DEFAULT_HOST = "0.0.0.0"
DEFAULT_PORT = 8000
# Options brq-serve owns; they must not be given to it again as pass-through arguments.
_OWNED = ("--quantization", "-q")

USAGE = """usage: brq-serve MODEL [--host HOST] [--port PORT] [--api-key-file FILE] [--print] [VLLM ARGS...]

Serve a BRQ checkpoint (from brq-convert) with vLLM: runs
  vllm serve MODEL --quantization brq --host HOST --port PORT [VLLM ARGS...]

  MODEL               checkpoint folder (or --model MODEL, or env BRQ_MODEL)
  --host HOST         bind address (env BRQ_HOST, default 0.0.0.0)
  --port PORT         port (env BRQ_PORT, default 8000)
  --api-key-file F    read the API key from file F (env VLLM_API_KEY_FILE); the key is
                      handed to vLLM as env VLLM_API_KEY, never on the command line
  --print, --dry-run  print the command instead of running it
  --healthcheck       exit 0 if the server on 127.0.0.1:PORT answers /health, else 1
  -h, --help          this help
Any other argument is passed to `vllm serve` as is (see `vllm serve --help`), then the
words of env BRQ_EXTRA_ARGS.
"""


class UsageError(ValueError):
    pass


def _take_value(args: list[str], i: int, name: str) -> tuple[str, int]:
    arg = args[i]
    if "=" in arg:
        return arg.split("=", 1)[1], i + 1
    if i + 1 >= len(args):
        raise UsageError(f"{name} needs a value")
    return args[i + 1], i + 2


def parse(argv: list[str], env: dict[str, str] | None = None) -> dict:
    """Split brq-serve's own options from the pass-through vLLM arguments."""
    env = dict(os.environ if env is None else env)
    model = None
    host = env.get("BRQ_HOST") or DEFAULT_HOST
    port = env.get("BRQ_PORT") or str(DEFAULT_PORT)
    key_file = env.get("VLLM_API_KEY_FILE") or None
    dry = False
    health = False
    extra: list[str] = []
    args = list(argv)
    n_cli = len(args)
    args += shlex.split(env.get("BRQ_EXTRA_ARGS") or "")
    i = 0
    while i < len(args):
        a = args[i]
        name = a.split("=", 1)[0]
        if model is None and not extra and i < n_cli and not a.startswith("-"):
            # MODEL: the first positional, before any pass-through argument
            model, i = a, i + 1
        elif a in ("-h", "--help"):
            return {"help": True}
        elif a in ("--print", "--dry-run"):
            dry, i = True, i + 1
        elif a == "--healthcheck":
            health, i = True, i + 1
        elif name == "--model":
            model, i = _take_value(args, i, name)
        elif name == "--host":
            host, i = _take_value(args, i, name)
        elif name == "--port":
            port, i = _take_value(args, i, name)
        elif name == "--api-key-file":
            key_file, i = _take_value(args, i, name)
        elif name == "--api-key":
            raise UsageError("--api-key would put the key on the command line: set VLLM_API_KEY "
                             "or VLLM_API_KEY_FILE instead")
        elif name in _OWNED:
            raise UsageError(f"{name} is set by brq-serve (always brq)")
        else:
            extra.append(a)
            i += 1
    model = model or env.get("BRQ_MODEL")
    if not str(port).isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"bad port {port!r}")
    if health:
        return {"help": False, "health": True, "port": int(port)}
    if not model:
        raise UsageError("no MODEL: give it as the first argument, --model, or env BRQ_MODEL")
    return {"help": False, "health": False, "model": model, "host": host, "port": int(port), "key_file": key_file,
            "dry": dry, "extra": extra}


def launcher(env: dict[str, str] | None = None) -> list[str]:
    env = os.environ if env is None else env
    return shlex.split(env.get("BRQ_VLLM_CMD") or "vllm")


def build_command(model: str, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
                  extra: list[str] | tuple[str, ...] = (), env: dict[str, str] | None = None) -> list[str]:
    """The argv that serves MODEL: the single source of the serve command line."""
    return [*launcher(env), "serve", str(model), "--quantization", "brq", "--host", str(host),
            "--port", str(port), *extra]


def check_checkpoint(model: str) -> str | None:
    """A message if MODEL is a local folder whose config.json is not a BRQ checkpoint."""
    cfg = Path(model) / "config.json"
    if not cfg.is_file():
        return None
    try:
        qc = json.loads(cfg.read_text()).get("quantization_config") or {}
    except (OSError, ValueError) as e:
        return f"{cfg}: unreadable ({e})"
    if qc.get("quant_method") != "brq":
        return (f"{cfg}: quantization_config.quant_method is {qc.get('quant_method')!r}, not 'brq': "
                "convert the model first (brq-convert MODEL OUT/)")
    return None


def healthcheck(port: int, timeout: float = 5.0) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=timeout) as r:
            return r.status == 200
    except OSError:
        return False


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        opts = parse(argv)
    except UsageError as e:
        print(f"brq-serve: {e}\n\n{USAGE}", file=sys.stderr)
        return 2
    if opts["help"]:
        print(USAGE)
        return 0
    if opts["health"]:
        return 0 if healthcheck(opts["port"]) else 1
    env = dict(os.environ)
    key_source = "VLLM_API_KEY" if env.get("VLLM_API_KEY") else None
    if opts["key_file"]:
        try:
            key = Path(opts["key_file"]).read_text().strip()
        except OSError as e:
            print(f"brq-serve: cannot read API key file: {e}", file=sys.stderr)
            return 2
        if not key:
            print(f"brq-serve: API key file {opts['key_file']} is empty", file=sys.stderr)
            return 2
        env["VLLM_API_KEY"] = key
        key_source = f"file {opts['key_file']}"
    cmd = build_command(opts["model"], opts["host"], opts["port"], opts["extra"], env)
    problem = check_checkpoint(opts["model"])
    if opts["dry"]:
        print(shlex.join(cmd))
        print(f"# API key: {'from ' + key_source if key_source else 'none (server open to anyone who reaches it)'}")
        if problem:
            print(f"# warning: {problem}")
        return 0
    if problem:
        print(f"brq-serve: {problem}", file=sys.stderr)
        return 2
    if not key_source:
        print("brq-serve: warning: no VLLM_API_KEY / VLLM_API_KEY_FILE: the API is open", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execvpe(cmd[0], cmd, env)
    except OSError as e:
        print(f"brq-serve: cannot run {cmd[0]!r}: {e}", file=sys.stderr)
    return 127


if __name__ == "__main__":
    sys.exit(main())
