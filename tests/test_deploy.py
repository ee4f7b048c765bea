"""Checks of ``deploy/``: the manifests parse, fit together, and every ``cbpo-orch``
command they or ``deploy/README.md`` show uses only flags the CLI has.

These are static checks: nothing here builds the image or talks to a cluster.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).parents[1]
DEPLOY = ROOT / "deploy"
KUBERAY = DEPLOY / "kuberay"
README = DEPLOY / "README.md"

# The CLI contract the deploy files are written against. To be replaced by the
# live `--help` output (test_flags_exist_in_the_live_cli already checks that).
TRAINING_FLAGS = {
    "--epochs", "--lr", "--beta", "--batch-size", "--aux-ratio", "--aux-strategy",
    "--gamma", "--gamma-estimator", "--gamma-max", "--reference", "--ema-decay",
    "--lora-r", "--lora-alpha", "--lora-dropout", "--lora-targets", "--weight-decay",
    "--max-grad-norm", "--warmup-ratio", "--max-prompt-tokens", "--max-profile",
    "--max-new-tokens", "--selection", "--selection-min-items", "--seed",
}
ALLOWED_FLAGS: dict[str, set[str]] = {
    "": set(),  # `cbpo-orch --help`
    "setup-model": {"--home"},
    "submit": {
        "--task", "--data", "--model", "--users", "--method", "--split", "--task-adapter",
        "--home", "--db", "--artifacts", "--address", "--cpus-per-user", "--gpus-per-user",
        "--workers", "--max-retries", "--detach",
    } | TRAINING_FLAGS,
    "status": {"--json", "--home", "--db"},
    "results": {"--format", "--home", "--db"},
    "resume": {"--address", "--home", "--db", "--artifacts"},
    "cancel": {"--home", "--db"},
    "generate": {"--job", "--user", "--home", "--db"},
}
for _flags in ALLOWED_FLAGS.values():
    _flags.add("--help")
REQUIRED_FLAGS = {
    "submit": {"--task", "--data", "--model", "--users", "--method"},
    "generate": {"--job", "--user"},
}
# The Kubernetes Secret with the cluster's Ray token: created by whoever deploys
# (`kubectl create secret generic …`), never committed.
RAY_TOKEN_SECRET = {"name": "cbpo-ray-token", "key": "auth_token"}
# Where the launcher config's containers read the token when RAY_AUTH_TOKEN_PATH is
# not set: Ray's default ~/.ray/auth_token for the rayproject images' user "ray".
RAY_DEFAULT_TOKEN_PATH = "/home/ray/.ray/auth_token"


# --------------------------------------------------------------------------- helpers


def load_all(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def the_one(path: Path, kind: str) -> dict:
    docs = [d for d in load_all(path) if d.get("kind") == kind]
    assert len(docs) == 1, f"{path.name}: expected one {kind}, found {len(docs)}"
    return docs[0]


def yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))


def strings_in(node) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for v in node.values() for s in strings_in(v)]
    if isinstance(node, list):
        return [s for v in node for s in strings_in(v)]
    return []


def mappings_in(node) -> list[dict]:
    """Every mapping in a parsed YAML tree, ``node`` included."""
    if isinstance(node, dict):
        return [node] + [m for v in node.values() for m in mappings_in(v)]
    if isinstance(node, list):
        return [m for v in node for m in mappings_in(v)]
    return []


_INVOKE = re.compile(r"(?<![\w./:@\[-])cbpo-orch(?=\s|$)")
_SPAN = re.compile(r"`([^`\n]+)`")
_FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
_PUNCT = ";&|()"
_COMMAND_WORDS = {"cbpo-orch", "kubectl", "ray", "docker", "sed", "pip"}


@dataclass
class Invocation:
    sub: str
    flags: list[str]
    words: list[str]
    source: str
    text: str

    def __str__(self) -> str:
        return f"{self.source}: cbpo-orch {' '.join(self.words)}"


def invocations(snippet: str, source: str) -> list[Invocation]:
    """Every ``cbpo-orch …`` command in one line of shell: its subcommand and flags,
    up to the end of the command (``|``, ``&&``, ``;``, ``)``)."""
    found = []
    for match in _INVOKE.finditer(snippet):
        rest = snippet[match.end():]
        try:
            lexer = shlex.shlex(rest, posix=True, punctuation_chars=_PUNCT)
            lexer.whitespace_split = True
            tokens = list(lexer)
        except ValueError:  # an unbalanced quote: the command sits inside quotes
            tokens = [t.strip("'\"") for t in rest.split()]
        words = []
        for token in tokens:
            if token and set(token) <= set(_PUNCT):
                break
            words.append(token)
        if not words:  # the bare name (a label, a cluster name), not a command
            continue
        sub = words[0] if not words[0].startswith("-") else ""
        flags = [w.split("=", 1)[0] for w in words if re.match(r"--?[A-Za-z]", w)]
        found.append(Invocation(sub, flags, words, source, snippet))
    return found


def _logical_lines(text: str) -> list[str]:
    """Lines with ``\\`` continuations joined (also inside ``#`` comments)."""
    lines, pending, in_comment = [], None, False
    for raw in text.splitlines():
        line = raw.strip()
        if pending is None:
            in_comment = line.startswith("#")
        else:
            if in_comment and line.startswith("#"):
                line = line[1:].strip()
            line = f"{pending} {line}"
        if line.endswith("\\"):
            pending = line[:-1].rstrip()
            continue
        pending = None
        lines.append(line)
    if pending is not None:
        lines.append(pending)
    return lines


def shell_snippets(text: str, comments_only: bool = False) -> list[str]:
    """The parts of shell-like text that are commands: code lines, comment lines
    that start with a command word, and `backtick` spans in comments."""
    out = []
    for line in _logical_lines(text):
        if line.startswith("#"):
            body = line.lstrip("#").strip()
            out += _SPAN.findall(body)
            if body.split(" ", 1)[0] in _COMMAND_WORDS:
                out.append(body)
        else:
            code, _, comment = line.partition(" #")
            if not comments_only:
                out.append(code)
            out += _SPAN.findall(comment)
    return out


def readme_code_blocks() -> list[str]:
    return _FENCE.findall(README.read_text(encoding="utf-8"))


def all_invocations() -> list[Invocation]:
    found: list[Invocation] = []
    for path in yaml_files():
        rel = str(path.relative_to(ROOT))
        # Comments of the raw file, and every string value once parsed (so folded
        # multi-line entrypoints are seen whole).
        for snippet in shell_snippets(path.read_text(), comments_only=True):
            found += invocations(snippet, rel + " (comment)")
        for value in (s for doc in load_all(path) for s in strings_in(doc)):
            for snippet in shell_snippets(value):
                found += invocations(snippet, rel)
    dockerfile = DEPLOY / "Dockerfile"
    for snippet in shell_snippets(dockerfile.read_text()):
        found += invocations(snippet, "deploy/Dockerfile")
    for block in readme_code_blocks():
        for snippet in shell_snippets(block):
            found += invocations(snippet, "deploy/README.md")
    prose = _FENCE.sub("", README.read_text(encoding="utf-8"))
    for span in _SPAN.findall(prose):
        found += invocations(span, "deploy/README.md (inline)")
    return found


def rayjob() -> dict:
    return the_one(KUBERAY / "rayjob.yaml", "RayJob")


def raycluster() -> dict:
    return the_one(KUBERAY / "raycluster.yaml", "RayCluster")


def ray_pods(cluster_spec: dict) -> list[tuple[str, dict]]:
    pods = [("head", cluster_spec["headGroupSpec"]["template"]["spec"])]
    pods += [(f"worker:{g['groupName']}", g["template"]["spec"]) for g in cluster_spec["workerGroupSpecs"]]
    return pods


def all_ray_pods() -> list[tuple[str, dict]]:
    return [(f"rayjob {role}", pod) for role, pod in ray_pods(rayjob()["spec"]["rayClusterSpec"])] + [
        (f"raycluster {role}", pod) for role, pod in ray_pods(raycluster()["spec"])
    ]


def toolbox() -> dict:
    return the_one(KUBERAY / "toolbox.yaml", "Pod")["spec"]


def client_pods() -> list[tuple[str, dict]]:
    """The pods that talk to a Ray cluster from outside it (``ray job submit``)."""
    submitter = rayjob()["spec"].get("submitterPodTemplate")
    assert submitter, "rayjob.yaml: no submitterPodTemplate, so KubeRay's default submitter (no Ray token) would run `ray job submit`"
    return [("toolbox", toolbox()), ("rayjob submitter", submitter["spec"])]


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def secrets_created_in(snippets: list[str]) -> dict[str, set[str]]:
    """Secret name -> keys, of the ``kubectl create secret generic NAME --from-literal=KEY=…``
    commands among ``snippets``."""
    found: dict[str, set[str]] = {}
    for snippet in snippets:
        for match in re.finditer(r"kubectl create secret generic ([\w.-]+)(.*)", snippet):
            found.setdefault(match.group(1), set()).update(re.findall(r"--from-(?:literal|file)=([\w.-]+)=", match.group(2)))
    return found


def documented_secrets() -> dict[str, set[str]]:
    """The Secrets that the manifests' comments and the README have the operator create."""
    snippets = [s for path in sorted(KUBERAY.glob("*.yaml")) for s in shell_snippets(path.read_text(), comments_only=True)]
    snippets += [s for block in readme_code_blocks() for s in shell_snippets(block)]
    return secrets_created_in(snippets)


# A token-like value: 32+ characters of hex or base64(url), not a path and not `$(…)`.
_TOKEN_VALUE = r"[A-Za-z0-9][A-Za-z0-9+/_-]{31,}={0,2}"
_LITERAL_TOKEN = re.compile(
    rf"(?:RAY_AUTH_TOKEN|auth_token)[\"']?\s*[:=]\s*[\"']?{_TOKEN_VALUE}"
    rf"|Bearer\s+{_TOKEN_VALUE}"
    r"|(?<![0-9A-Fa-f])[0-9A-Fa-f]{32,}(?![0-9A-Fa-f])",
    re.I,
)


def literal_tokens(text: str) -> list[str]:
    return [m.group(0) for m in _LITERAL_TOKEN.finditer(text)]


def shared_claim() -> str:
    return the_one(KUBERAY / "pvc.yaml", "PersistentVolumeClaim")["metadata"]["name"]


def shared_mount(pod: dict, container: dict) -> str:
    """Where ``container`` mounts the shared PVC."""
    names = [v["name"] for v in pod["volumes"] if v.get("persistentVolumeClaim", {}).get("claimName") == shared_claim()]
    assert len(names) == 1, f"pod must have exactly one volume of PVC {shared_claim()}"
    mounts = [m["mountPath"] for m in container.get("volumeMounts", []) if m["name"] == names[0]]
    assert len(mounts) == 1, f"container {container['name']} must mount the shared PVC once"
    return mounts[0]


def flag_value(words: list[str], flag: str) -> str | None:
    for i, word in enumerate(words):
        if word == flag and i + 1 < len(words):
            return words[i + 1]
        if word.startswith(flag + "="):
            return word.split("=", 1)[1]
    return None


# --------------------------------------------------------------------------- tests


def test_the_deploy_files_are_there():
    expected = {
        "Dockerfile", "ray-cluster.yaml", "README.md",
        "kuberay/rayjob.yaml", "kuberay/raycluster.yaml", "kuberay/pvc.yaml", "kuberay/postgres.yaml",
    }
    present = {str(p.relative_to(DEPLOY)) for p in DEPLOY.rglob("*") if p.is_file()}
    assert expected <= present, f"missing: {sorted(expected - present)}"


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_yaml_parses(path):
    docs = load_all(path)
    assert docs, f"{path} holds no document"
    for doc in docs:
        assert isinstance(doc, dict), f"{path}: a document is not a mapping"
        if KUBERAY in path.parents:
            assert doc.get("apiVersion") and doc.get("kind"), f"{path}: apiVersion and kind are required"
            assert doc.get("metadata", {}).get("name"), f"{path}: {doc['kind']} has no metadata.name"


def test_rayjob_runs_cbpo_orch_submit_on_the_cluster():
    job = rayjob()
    assert job["apiVersion"] == "ray.io/v1"
    assert job["kind"] == "RayJob"
    spec = job["spec"]
    entrypoint = " ".join(spec["entrypoint"].split())
    assert entrypoint.startswith("cbpo-orch submit ")
    [call] = invocations(entrypoint, "entrypoint")
    assert flag_value(call.words, "--address") == "auto", "the driver must join the RayJob's cluster"
    assert flag_value(call.words, "--users") == "all"
    assert {"cbpo", "sft"} <= set(flag_value(call.words, "--method").split(","))
    assert "--detach" not in call.flags, "a detached submit would end the RayJob (and delete its cluster) at once"
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec.get("backoffLimit", 0) == 0, "a retried entrypoint would start a new job instead of resuming"
    cluster = spec["rayClusterSpec"]
    assert cluster["headGroupSpec"]["template"]["spec"]["containers"]
    gpu_groups = [
        g for g in cluster["workerGroupSpecs"]
        if any(float(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0)) > 0 for c in g["template"]["spec"]["containers"])
    ]
    assert gpu_groups, "no worker group asks for nvidia.com/gpu"


def test_scanner_finds_commands_and_their_flags():
    text = 'x=$(cbpo-orch status --json | jq .) && kubectl exec pod -- cbpo-orch results "$JOB" --format=csv \\\n  --bogus 1; echo cbpo-orch.env /a/cbpo-orch[postgres] name: cbpo-orch'
    calls = [c for s in shell_snippets(text) for c in invocations(s, "t")]
    assert [(c.sub, c.flags) for c in calls] == [("status", ["--json"]), ("results", ["--format", "--bogus"])]
    comment = "# run `cbpo-orch resume JOB --adress auto` later\n#   cbpo-orch cancel JOB \\\n#     --home /h"
    calls = [c for s in shell_snippets(comment) for c in invocations(s, "t")]
    assert [(c.sub, c.flags) for c in calls] == [("resume", ["--adress"]), ("cancel", ["--home"])]


def test_every_cbpo_orch_command_uses_contract_flags():
    calls = all_invocations()
    problems = []
    for call in calls:
        if call.sub not in ALLOWED_FLAGS:
            problems.append(f"unknown subcommand {call.sub!r} in {call}")
            continue
        unknown = [f for f in call.flags if f not in ALLOWED_FLAGS[call.sub]]
        if unknown:
            problems.append(f"{unknown} not flags of `cbpo-orch {call.sub}` in {call}")
        missing = REQUIRED_FLAGS.get(call.sub, set()) - set(call.flags)
        if call.flags and missing:
            problems.append(f"{sorted(missing)} missing in {call}")
    assert not problems, "\n".join(problems)
    # The scanner must actually have seen the walkthrough's commands.
    readme_subs = {c.sub for c in calls if c.source == "deploy/README.md"}
    assert {"setup-model", "submit", "status", "results", "resume", "generate"} <= readme_subs
    assert any(c.source == "deploy/kuberay/rayjob.yaml" and c.sub == "submit" for c in calls)


def test_flags_exist_in_the_live_cli():
    try:
        import typer

        from cbpo_orch.cli.main import app
        group = typer.main.get_command(app)
    except Exception as error:  # the CLI is being written alongside
        pytest.skip(f"cbpo_orch CLI not importable: {error}")
    live = {name: {o for p in cmd.params for o in (*p.opts, *p.secondary_opts) if o.startswith("-")} | {"--help"} for name, cmd in group.commands.items()}
    live[""] = {"--help"}
    problems = []
    for call in all_invocations():
        if call.sub not in live:
            problems.append(f"no subcommand {call.sub!r} in the CLI: {call}")
        elif unknown := [f for f in call.flags if f not in live[call.sub]]:
            problems.append(f"{unknown} not accepted by `cbpo-orch {call.sub}`: {call}")
    assert not problems, "\n".join(problems)


def test_cluster_launcher_config_installs_cbpo_orch_everywhere():
    config = load_all(DEPLOY / "ray-cluster.yaml")[0]
    try:
        import jsonschema
        import ray.autoscaler
    except ImportError:
        jsonschema = None
    if jsonschema is not None:
        schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
        jsonschema.validate(config, schema)

    def installs(commands) -> bool:
        return any(re.search(r"pip install .*cbpo-orch", c) for c in commands or [])

    common = installs(config.get("setup_commands"))
    assert common or (installs(config.get("head_setup_commands")) and installs(config.get("worker_setup_commands"))), (
        "cbpo-orch must be installed on the head and on every worker"
    )
    # What is installed is synced to the nodes.
    sources = {m.group(1) for c in config["setup_commands"] if (m := re.search(r"pip install .*?\"?(/[\w/.-]+)\[", c))}
    assert sources and sources <= set(config["file_mounts"]), "the installed source folder is not in file_mounts"
    # A GPU (CUDA) torch, never the CPU wheel index.
    torch_lines = [c for c in config["setup_commands"] if "torch==" in c]
    assert torch_lines and all("whl/cu" in c and "whl/cpu" not in c for c in torch_lines)
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=0.0.0.0" in head_start and "--dashboard-port=8265" in head_start
    gpu_types = [t for t, node in config["available_node_types"].items() if t != config["head_node_type"]]
    assert gpu_types, "no worker node type"
    # Shared storage reaches the container, and the home folder lives on it.
    run_options = " ".join(config["docker"]["run_options"])
    assert "-v /mnt/cbpo:/mnt/cbpo" in run_options
    assert re.search(r"-e CBPO_ORCH_HOME=/mnt/cbpo/\S+", run_options)


def test_pvc_is_read_write_many():
    pvc = the_one(KUBERAY / "pvc.yaml", "PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert pvc["spec"]["resources"]["requests"]["storage"]


def test_manifests_reference_what_exists():
    claim = shared_claim()
    secrets = {
        d["metadata"]["name"]: set(d.get("stringData", {})) | set(d.get("data", {}))
        for d in load_all(KUBERAY / "postgres.yaml") if d["kind"] == "Secret"
    }
    # ... and those the operator creates (the Ray token's): not committed, so they
    # exist only as the documented `kubectl create secret` commands.
    for name, keys in documented_secrets().items():
        secrets.setdefault(name, set()).update(keys)
    assert RAY_TOKEN_SECRET["key"] in secrets.get(RAY_TOKEN_SECRET["name"], set()), "no command creates the Ray token's Secret"
    for path in sorted(KUBERAY.glob("*.yaml")):
        for node in mappings_in(load_all(path)):
            if "claimName" in node:
                assert node["claimName"] == claim, f"{path.name}: unknown PVC {node['claimName']}"
            if "secretKeyRef" in node:
                ref = node["secretKeyRef"]
                assert ref["key"] in secrets.get(ref["name"], set()), f"{path.name}: no Secret key {ref}"


def test_one_image_and_one_ray_version_everywhere():
    images = {c["image"] for _, pod in all_ray_pods() for c in pod["containers"]}
    # The clients too: the submitter runs `ray job submit`, of the cluster's Ray version.
    images |= {c["image"] for _, pod in client_pods() for c in pod["containers"] + pod.get("initContainers", [])}
    assert len(images) == 1, f"several cbpo-orch images: {sorted(images)}"
    docker_version = re.search(r"^ARG RAY_VERSION=(\S+)$", (DEPLOY / "Dockerfile").read_text(), re.M).group(1)
    assert rayjob()["spec"]["rayClusterSpec"]["rayVersion"] == docker_version
    assert raycluster()["spec"]["rayVersion"] == docker_version
    launcher = load_all(DEPLOY / "ray-cluster.yaml")[0]
    assert launcher["docker"]["image"].startswith(f"rayproject/ray:{docker_version}-")
    assert any(f"ray[default]=={docker_version}" in c for c in launcher["setup_commands"])


def test_dockerfile_builds_a_gpu_image_with_postgres():
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^ARG FLAVOR=gpu$", text, re.M)
    assert re.search(r"^FROM rayproject/ray:\$\{RAY_VERSION\}-\S*\$\{FLAVOR\}", text, re.M)
    assert re.search(r"pip install [^\n]*\[postgres\]", text)
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    for i, line in enumerate(lines):
        if "whl/cpu" in line:  # the CPU wheel index only on the cpu branch
            assert '"cpu"' in lines[i - 1], f"CPU torch index outside the FLAVOR=cpu branch: {line}"


def test_shared_storage_holds_home_data_and_model():
    mounts = set()
    for role, pod in all_ray_pods():
        for container in pod["containers"]:
            mount = shared_mount(pod, container)
            mounts.add(mount)
            home = env_of(container)["CBPO_ORCH_HOME"]["value"]
            assert home.startswith(mount + "/"), f"{role}: CBPO_ORCH_HOME {home} is not on the shared PVC"
            has_db = "CBPO_ORCH_DB" in env_of(container)
            assert has_db == role.endswith("head"), f"{role}: only the head (the driver) gets CBPO_ORCH_DB"
    mounts.add(shared_mount(toolbox(), toolbox()["containers"][0]))
    assert len(mounts) == 1, f"the shared PVC is mounted at different paths: {mounts}"
    [mount] = mounts
    [call] = invocations(" ".join(rayjob()["spec"]["entrypoint"].split()), "entrypoint")
    for flag in ("--data", "--model"):
        value = flag_value(call.words, flag) or ""
        assert value.startswith(mount + "/"), f"{flag} {value!r} is not on the shared PVC ({mount})"


def test_registry_secret_matches_the_database():
    from sqlalchemy.engine import make_url

    docs = load_all(KUBERAY / "postgres.yaml")
    secret = next(d for d in docs if d["kind"] == "Secret")["stringData"]
    service = next(d for d in docs if d["kind"] == "Service")
    statefulset = next(d for d in docs if d["kind"] == "StatefulSet")
    url = make_url(secret["url"])
    assert url.drivername == "postgresql+psycopg"
    assert (url.username, url.password, url.database) == (secret["POSTGRES_USER"], secret["POSTGRES_PASSWORD"], secret["POSTGRES_DB"])
    assert url.host == service["metadata"]["name"]
    assert url.port in {p["port"] for p in service["spec"]["ports"]}
    labels = statefulset["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items(), "the Service selects no PostgreSQL pod"


def test_readme_paths_exist():
    missing = []
    for block in readme_code_blocks():
        for path in re.findall(r"(?<![\w/.-])((?:deploy|cbpo_orch)/[\w./-]*\w)", block):
            if not (ROOT / path).exists():
                missing.append(path)
    assert not missing, f"deploy/README.md names paths that do not exist: {missing}"


def test_every_ray_container_and_client_has_the_token_from_the_secret():
    problems = []
    for role, pod in all_ray_pods() + client_pods():
        for container in pod["containers"]:
            env, where = env_of(container), f"{role} ({container['name']})"
            if env.get("RAY_AUTH_MODE", {}).get("value") != "token":
                problems.append(f"{where}: RAY_AUTH_MODE is not 'token'")
            token = env.get("RAY_AUTH_TOKEN", {})
            if "value" in token or token.get("valueFrom", {}).get("secretKeyRef") != RAY_TOKEN_SECRET:
                problems.append(f"{where}: RAY_AUTH_TOKEN must come from secretKeyRef {RAY_TOKEN_SECRET} alone, got {token}")
    assert not problems, "\n".join(problems)
    # The submitter is KubeRay's own `ray job submit`: KubeRay supplies the command
    # (from `entrypoint`) only when the template has none; a Job's pod never restarts.
    submitter = rayjob()["spec"]["submitterPodTemplate"]["spec"]
    assert "command" not in submitter["containers"][0] and "args" not in submitter["containers"][0]
    assert submitter["restartPolicy"] == "Never"
    # Each manifest that uses the Secret says, at its top, how to create it.
    for path in sorted(KUBERAY.glob("*.yaml")):
        if RAY_TOKEN_SECRET["name"] in strings_in(load_all(path)):
            created = secrets_created_in(shell_snippets(path.read_text(), comments_only=True))
            assert RAY_TOKEN_SECRET["key"] in created.get(RAY_TOKEN_SECRET["name"], set()), (
                f"{path.name}: its comments do not show the `kubectl create secret generic {RAY_TOKEN_SECRET['name']}` command"
            )


def test_cluster_launcher_config_gives_every_node_the_token_file():
    config = load_all(DEPLOY / "ray-cluster.yaml")[0]
    run_options = config["docker"]["run_options"]
    assert "-e RAY_AUTH_MODE=token" in run_options, "the containers do not turn token authentication on"
    # The token itself never in `docker run` (which `ray up` prints): only its file.
    assert not [o for o in run_options if "RAY_AUTH_TOKEN=" in o], "the token in docker run_options (printed by `ray up`)"
    targets = [dst for dst, src in config["file_mounts"].items() if src == "~/.ray/auth_token"]
    assert len(targets) == 1, "file_mounts must copy ~/.ray/auth_token (`ray get-auth-token --generate`) to the nodes"
    target = re.sub(r"^~/", "/home/ray/", targets[0])  # the launcher mounts it into the container there
    paths = [m.group(1) for o in run_options if (m := re.fullmatch(r"-e RAY_AUTH_TOKEN_PATH=(\S+)", o))]
    assert paths in ([], [target]) and (paths or target == RAY_DEFAULT_TOKEN_PATH), (
        f"the container's Ray reads {paths or RAY_DEFAULT_TOKEN_PATH}, not the synced token file {target}"
    )
    # Not inside the synced (and installed) repository checkout.
    checkouts = [dst.rstrip("/") + "/" for dst, src in config["file_mounts"].items() if src in (".", "./")]
    assert checkouts and not any(target.startswith(c) for c in checkouts)
    # No command touches the token: `ray up` logs the commands and their output.
    commands = [c for key, value in config.items() if key.endswith("_commands") for c in value or []]
    assert not [c for c in commands if re.search(r"auth_token|RAY_AUTH_TOKEN|get-auth-token", c)]


def test_literal_token_detector():
    hex64, b64 = "3f" * 32, "q8Zx/Lw2+Yt4NvR0mKp7sJd1HfG6bCe9aUi3oWy5=="
    for text in (
        f"RAY_AUTH_TOKEN={hex64}", f"export RAY_AUTH_TOKEN='{b64}'", f"--from-literal=auth_token={b64}",
        f"- {{name: RAY_AUTH_TOKEN, value: {hex64}}}", f'curl -H "Authorization: Bearer {b64}"', f"a digest {hex64}",
    ):
        assert literal_tokens(text), text
    for text in (
        "kubectl create secret generic cbpo-ray-token --from-literal=auth_token=$(openssl rand -hex 32)",
        "-e RAY_AUTH_TOKEN_PATH=/home/ray/.ray/auth_token", "/home/ray/.ray/auth_token: ~/.ray/auth_token",
        'curl -H "Authorization: Bearer $(ray get-auth-token)"', "key: auth_token",
        "--model /mnt/cbpo/home/models/SmolLM2-135M-Instruct", "TOKENIZERS_PARALLELISM=false",
    ):
        assert not literal_tokens(text), text


def test_no_token_is_committed_under_deploy():
    files = sorted(p for p in DEPLOY.rglob("*") if p.is_file())
    found = {str(p.relative_to(ROOT)): hits for p in files if (hits := literal_tokens(p.read_text(encoding="utf-8")))}
    assert not found, f"token-like values under deploy/: {found}"

    problems = []
    for path in yaml_files():
        for node in mappings_in(load_all(path)):
            if node.get("kind") == "Secret" and node.get("metadata", {}).get("name") == RAY_TOKEN_SECRET["name"]:
                problems.append(f"{path.name}: the Ray token's Secret is committed (it is created at deploy time)")
            if node.get("name") == "RAY_AUTH_TOKEN" and "value" in node:
                problems.append(f"{path.name}: RAY_AUTH_TOKEN with a literal value")
            if "RAY_AUTH_TOKEN" in node:
                problems.append(f"{path.name}: RAY_AUTH_TOKEN set as a mapping key (a runtime_env or the like)")
    # In the manifests the token is only ever an env var from the Secret: no command
    # (entrypoint, command, args) reads or prints it, which would put it into a log.
    problems += [
        f"{path.name}: {value!r} handles the token"
        for path in sorted(KUBERAY.glob("*.yaml")) for value in strings_in(load_all(path))
        if value not in ("RAY_AUTH_TOKEN", RAY_TOKEN_SECRET["key"]) and re.search(r"RAY_AUTH_TOKEN|auth_token|get-auth-token", value)
    ]
    assert not problems, "\n".join(problems)
