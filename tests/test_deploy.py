"""Deployment files: KubeRay manifests, the cluster-launcher YAML, Prometheus, Dockerfiles.

Static checks only (no Kubernetes, Docker or Ray is started): every YAML under deploy/
parses; the KubeRay resources are ``ray.io/v1`` with token auth from a Secret, a GPU-less
head, GPU worker groups, pinned images, non-root pods, shared storage and no public
exposure of the dashboard; every ``python -m trainer.run`` command in the manifests and in
deploy/README.md parses with the trainer's own CLI; the Dockerfiles pin their versions,
run as a non-root user and keep faiss-cpu out of the GPU image.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from trainer.config import TrainConfig
from trainer.flags import build_parser, parse_config

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
KUBERAY = DEPLOY / "kuberay"
CLUSTER_YAML = DEPLOY / "cluster" / "npid-cluster.yaml"
PROMETHEUS_YML = DEPLOY / "prometheus" / "prometheus.yml"
DOCKERFILES = {"cpu": REPO / "docker" / "Dockerfile.cpu", "gpu": REPO / "docker" / "Dockerfile.gpu"}
TRAINER = "python -m trainer.run"
#: Ray's file-based service-discovery file (ray._private.ray_constants, Ray 2.60).


# --- helpers ---------------------------------------------------------------------------


def yaml_files() -> list[Path]:
    """Every YAML file under deploy/."""
    return sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")])


@functools.cache
def _parse(path: Path) -> tuple[Any, ...]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with path.open(encoding="utf-8") as fh:
        return tuple(d for d in yaml.load_all(fh, Loader=loader) if d is not None)


def load_docs(path: Path) -> list[Any]:
    """The non-empty documents of a YAML file (parsed once; callers must not mutate them)."""
    return list(_parse(path))


def kube_docs() -> list[dict[str, Any]]:
    """All Kubernetes objects under deploy/kuberay/."""
    return [d for p in sorted(KUBERAY.glob("*.yaml")) for d in load_docs(p)]


def ray_objects(kind: str) -> list[dict[str, Any]]:
    """The ``ray.io`` objects of ``kind``."""
    return [d for d in kube_docs() if d.get("kind") == kind]


def cluster_specs() -> list[tuple[str, dict[str, Any]]]:
    """(name, RayCluster spec) of every RayCluster and every RayJob's rayClusterSpec."""
    specs = [(d["metadata"]["name"], d["spec"]) for d in ray_objects("RayCluster")]
    specs += [(d["metadata"]["name"], d["spec"]["rayClusterSpec"]) for d in ray_objects("RayJob")]
    return specs


def ray_pod_specs() -> list[tuple[str, dict[str, Any]]]:
    """(label, pod spec) of every Ray head and worker group (submitters excluded)."""
    pods = []
    for name, spec in cluster_specs():
        pods.append((f"{name}/head", spec["headGroupSpec"]["template"]["spec"]))
        for group in spec.get("workerGroupSpecs", []):
            pods.append((f"{name}/{group['groupName']}", group["template"]["spec"]))
    return pods


def all_pod_specs() -> list[tuple[str, dict[str, Any]]]:
    """Ray pods plus the RayJob submitter pods."""
    pods = ray_pod_specs()
    for job in ray_objects("RayJob"):
        template = job["spec"].get("submitterPodTemplate")
        if template:
            pods.append((f"{job['metadata']['name']}/submitter", template["spec"]))
    return pods


def containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod.get("initContainers", []), *pod["containers"]]


def image_is_pinned(image: str) -> bool:
    """``repo[:port]/name:tag`` with an explicit tag other than ``latest`` (or a digest)."""
    if "@sha256:" in image:
        return True
    last = image.rsplit("/", 1)[-1]
    if ":" not in last:
        return False
    tag = last.rsplit(":", 1)[1]
    return bool(re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}", tag)) and tag != "latest"


def trainer_args(command: str) -> list[str]:
    """The arguments after ``python -m trainer.run`` in one shell command line."""
    words = shlex.split(command, comments=True)
    for i in range(len(words) - 2):
        if words[i : i + 3] == ["python", "-m", "trainer.run"]:
            rest = words[i + 3 :]
            for j, word in enumerate(rest):
                if word in ("&&", "||", ";", "|") or word.startswith(("|", ";", "&")):
                    return rest[:j]
            return rest
    raise AssertionError(f"no {TRAINER!r} in {command!r}")


def readme_commands(text: str) -> list[str]:
    """Shell commands of fenced code blocks, backslash continuations joined."""
    commands = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.DOTALL):
        joined = re.sub(r"\\\n\s*", " ", block)
        commands += [line.strip() for line in joined.splitlines() if line.strip()]
    return commands


def entrypoint_commands() -> list[tuple[str, str]]:
    """(where, command) of every ``python -m trainer.run`` in the manifests and README."""
    found = [
        (f"rayjob {job['metadata']['name']}", job["spec"]["entrypoint"])
        for job in ray_objects("RayJob")
    ]
    readme = DEPLOY / "README.md"
    found += [
        (f"{readme.name}: {cmd[:60]}", cmd)
        for cmd in readme_commands(readme.read_text(encoding="utf-8"))
        if TRAINER in cmd
    ]
    return found


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    lines, current = [], ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        stripped = raw.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        lines.append(current)
        current = ""
    out = []
    for line in lines:
        instruction, _, args = line.partition(" ")
        out.append((instruction.upper(), args.strip()))
    return out


def pip_requirements(run_args: str) -> list[str]:
    """The requirement arguments of every ``pip install`` in a RUN line (options dropped)."""
    reqs = []
    for segment in re.split(r"&&|;|\|\|", run_args):
        words = shlex.split(segment)
        if words[:2] != ["pip", "install"]:
            continue
        skip_next = False
        for word in words[2:]:
            if skip_next:
                skip_next = False
            elif word in ("--index-url", "-i", "--extra-index-url", "-c", "-r", "--constraint"):
                skip_next = True
            elif not word.startswith("-"):
                reqs.append(word)
    return reqs


# --- every YAML ------------------------------------------------------------------------


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_yaml_under_deploy_parses(path):
    docs = load_docs(path)
    assert docs, f"{path} is empty"
    assert all(isinstance(d, dict) for d in docs)
    if path.parent == KUBERAY:
        for doc in docs:
            assert doc.get("apiVersion") and doc.get("kind"), f"{path}: {doc}"
            assert doc.get("metadata", {}).get("name"), f"{path}: unnamed {doc['kind']}"


def test_deploy_tree_has_the_expected_files():
    for rel in (
        "README.md",
        "kuberay/raycluster.yaml",
        "kuberay/rayjob.yaml",
        "kuberay/secret.example.yaml",
        "cluster/npid-cluster.yaml",
        "prometheus/prometheus.yml",
        "grafana/npid-dashboard.json",
    ):
        assert (DEPLOY / rel).is_file(), rel


# --- KubeRay ---------------------------------------------------------------------------


def test_kuberay_defines_a_raycluster_and_a_rayjob_in_ray_io_v1():
    kinds = {(d["apiVersion"], d["kind"]) for d in kube_docs() if d["kind"].startswith("Ray")}
    assert ("ray.io/v1", "RayCluster") in kinds
    assert ("ray.io/v1", "RayJob") in kinds
    assert all(api == "ray.io/v1" for api, _ in kinds), kinds
    for _, spec in cluster_specs():
        assert spec["rayVersion"] == "2.60.0"


def test_rayjob_cluster_is_the_raycluster_manifest():
    (cluster,) = ray_objects("RayCluster")
    for job in ray_objects("RayJob"):
        assert job["spec"]["rayClusterSpec"] == cluster["spec"]


def test_rayjob_entrypoint_runs_the_trainer_on_gpus_with_shared_output():
    for job in ray_objects("RayJob"):
        entrypoint = job["spec"]["entrypoint"]
        assert entrypoint.startswith(f"{TRAINER} "), entrypoint
        cfg = parse_config(trainer_args(entrypoint))
        assert cfg.use_gpu
        assert cfg.data.startswith("s3://")
        assert cfg.output.startswith("/mnt/npid/")
        assert cfg.num_workers > 1 and cfg.num_shards >= 1
        assert job["spec"]["shutdownAfterJobFinishes"] is True


def test_head_has_no_gpus_and_workers_request_gpus():
    for name, spec in cluster_specs():
        head = spec["headGroupSpec"]
        assert head["rayStartParams"]["num-gpus"] == "0", name
        for c in containers(head["template"]["spec"]):
            for section in ("requests", "limits"):
                assert "nvidia.com/gpu" not in c["resources"].get(section, {}), name
        groups = spec["workerGroupSpecs"]
        assert groups, name
        for group in groups:
            (ray,) = group["template"]["spec"]["containers"]
            gpus = ray["resources"]["limits"].get("nvidia.com/gpu")
            assert gpus is not None and int(gpus) >= 1, (name, group["groupName"])
            assert ray["resources"]["requests"]["nvidia.com/gpu"] == gpus


def test_gpus_cover_trainer_workers_plus_store_shards():
    """Trainers take whole GPUs; each shard may hold a fraction of another GPU."""
    (cluster,) = ray_objects("RayCluster")
    total = sum(
        int(g["replicas"]) * int(g["template"]["spec"]["containers"][0]["resources"]["limits"]
                                 ["nvidia.com/gpu"])
        for g in cluster["spec"]["workerGroupSpecs"]
    )  # fmt: skip
    for job in ray_objects("RayJob"):
        cfg = parse_config(trainer_args(job["spec"]["entrypoint"]))
        assert total >= cfg.num_workers + cfg.num_shards, (total, cfg.num_workers)


def test_readme_shows_the_rayjob_entrypoint():
    readme = (DEPLOY / "README.md").read_text(encoding="utf-8")
    shown = [trainer_args(c) for c in readme_commands(readme) if TRAINER in c]
    for job in ray_objects("RayJob"):
        assert trainer_args(job["spec"]["entrypoint"]) in shown


def test_images_are_pinned_by_tag():
    images = [c["image"] for _, pod in all_pod_specs() for c in containers(pod)]
    images.append(load_docs(CLUSTER_YAML)[0]["docker"]["image"])
    assert images
    for image in images:
        assert image_is_pinned(image), image


def test_image_pin_check_itself():
    assert image_is_pinned("registry.example.com:5000/npid:0.1.0-gpu")
    assert not image_is_pinned("registry.example.com:5000/npid")
    assert not image_is_pinned("npid:latest")
    assert not image_is_pinned("npid")


def test_ray_auth_token_comes_from_a_secret_on_every_container():
    secrets = {
        d["metadata"]["name"]: set(d.get("stringData", {})) | set(d.get("data", {}))
        for d in kube_docs()
        if d["kind"] == "Secret"
    }
    for label, pod in all_pod_specs():
        for c in pod["containers"]:
            env = {e["name"]: e for e in c.get("env", [])}
            assert env["RAY_AUTH_MODE"]["value"] == "token", label
            token = env["RAY_AUTH_TOKEN"]
            assert "value" not in token, f"{label}: literal RAY_AUTH_TOKEN"
            ref = token["valueFrom"]["secretKeyRef"]
            assert ref["key"] in secrets[ref["name"]], (label, ref)


def test_dashboard_is_not_exposed():
    for doc in kube_docs():
        assert doc["kind"] not in ("Ingress", "Route", "Gateway", "HTTPRoute"), doc["kind"]
        if doc["kind"] == "Service":
            assert doc["spec"].get("type", "ClusterIP") == "ClusterIP", doc["metadata"]
    for name, spec in cluster_specs():
        head = spec["headGroupSpec"]
        assert head.get("serviceType", "ClusterIP") == "ClusterIP", name
        assert not head.get("enableIngress", False), name
    values = json.dumps(kube_docs())  # every key and value, comments left out
    assert "LoadBalancer" not in values and "NodePort" not in values
    readme = (DEPLOY / "README.md").read_text(encoding="utf-8")
    assert "kubectl -n npid port-forward service/npid-head-svc 8265:8265" in readme


def test_pods_run_as_non_root_without_privilege_escalation():
    for label, pod in all_pod_specs():
        ctx = pod["securityContext"]
        assert ctx["runAsNonRoot"] is True, label
        assert int(ctx["runAsUser"]) != 0, label
        for c in containers(pod):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, label
            assert sc["capabilities"]["drop"] == ["ALL"], label
            assert not sc.get("privileged", False), label


def test_every_container_has_cpu_and_memory_requests_and_limits():
    for label, pod in all_pod_specs():
        for c in containers(pod):
            for section in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][section]), (label, section)


def test_ray_pods_mount_the_shared_rwx_volume():
    claims = {d["metadata"]["name"]: d for d in kube_docs() if d["kind"] == "PersistentVolumeClaim"}
    assert claims
    for claim in claims.values():
        assert "ReadWriteMany" in claim["spec"]["accessModes"]
    for label, pod in ray_pod_specs():
        volumes = {v["name"]: v for v in pod["volumes"]}
        (ray,) = pod["containers"]
        mounts = {m["mountPath"]: m["name"] for m in ray["volumeMounts"]}
        volume = volumes[mounts["/mnt/npid"]]
        assert volume["persistentVolumeClaim"]["claimName"] in claims, label


# --- trainer commands everywhere -------------------------------------------------------


def test_trainer_commands_in_manifests_and_readme_parse_with_the_cli():
    commands = entrypoint_commands()
    assert len(commands) >= 4, commands
    parser = build_parser()
    flags = {s for action in parser._actions for s in action.option_strings}
    for where, command in commands:
        args = trainer_args(command)
        # exact spellings: argparse would also accept unambiguous abbreviations
        used = {a.split("=", 1)[0] for a in args if a.startswith("-")}
        assert used <= flags, f"{where}: unknown flags {sorted(used - flags)}"
        try:
            namespace = build_parser().parse_args(args)
        except SystemExit:
            pytest.fail(f"{where}: `{TRAINER} {' '.join(args)}` has an unknown or bad flag")
        assert namespace.data, where
        cfg = parse_config(args)  # also the config's own consistency checks
        assert isinstance(cfg, TrainConfig)


def knn_serve_flags() -> set[str]:
    """Option strings of ``python -m knn_service.serve``, read from its source (importing it
    pulls in torch and FAISS: seconds)."""
    tree = ast.parse((REPO / "knn_service" / "serve.py").read_text(encoding="utf-8"))
    flags = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
            flags |= {a.value for a in node.args if isinstance(a, ast.Constant)}
    return flags


def test_knn_service_commands_in_the_docs_use_its_flags():
    if not (REPO / "knn_service" / "serve.py").is_file():
        pytest.skip("knn_service.serve not written yet")
    flags = knn_serve_flags()
    assert "--store-name" in flags
    module = "python -m knn_service.serve"
    found = 0
    for doc in (DEPLOY / "README.md", REPO / "docker" / "README.md"):
        for command in readme_commands(doc.read_text(encoding="utf-8")):
            if module not in command:
                continue
            words = shlex.split(command.split(module, 1)[1], comments=True)
            used = {w.split("=", 1)[0] for w in words if w.startswith("--")}
            assert "--store-name" in used, command
            assert used <= flags, f"{doc.name}: unknown flags {sorted(used - flags)}"
            found += 1
    assert found >= 2


def test_trainer_args_helper():
    args = trainer_args("cd x && python -m trainer.run --epochs 3 --use-gpu | tee log")
    assert args == ["--epochs", "3", "--use-gpu"]
    with pytest.raises(AssertionError):
        trainer_args("python -m knn_service.serve")


# --- cluster launcher ------------------------------------------------------------------


def test_cluster_launcher_yaml_names_head_and_gpu_worker_types():
    (cfg,) = load_docs(CLUSTER_YAML)
    types = cfg["available_node_types"]
    head = cfg["head_node_type"]
    assert head in types
    assert types[head]["resources"] == {"CPU": 0, "GPU": 0}
    workers = [name for name in types if name != head]
    assert workers and all(types[w]["max_workers"] >= types[w]["min_workers"] for w in workers)
    assert image_is_pinned(cfg["docker"]["image"])
    assert "--env RAY_AUTH_MODE=token" in cfg["docker"]["run_options"]
    assert any("RAY_AUTH_TOKEN_PATH=" in o for o in cfg["docker"]["run_options"])
    assert any(".ray/auth_token" in target for target in cfg["file_mounts"])
    head_start = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "--num-gpus=0" in head_start
    assert "0.0.0.0" not in head_start


def test_cluster_launcher_yaml_matches_rays_schema():
    jsonschema = pytest.importorskip("jsonschema")
    spec = importlib.util.find_spec("ray")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("ray not installed")
    schema_path = Path(spec.submodule_search_locations[0]) / "autoscaler" / "ray-schema.json"
    schema = json.loads(schema_path.read_text(encoding="utf-8"))
    jsonschema.validate(load_docs(CLUSTER_YAML)[0], schema)


# --- Prometheus ------------------------------------------------------------------------


def test_prometheus_discovers_ray_through_the_dashboard_of_the_running_session():
    (cfg,) = load_docs(PROMETHEUS_YML)
    assert cfg["global"]["scrape_interval"] in ("5s", "10s")
    jobs = {job["job_name"]: job for job in cfg["scrape_configs"]}
    assert "file_sd_configs" not in jobs["ray"]  # a file that outlives its session
    (sd,) = jobs["ray"]["http_sd_configs"]
    assert sd["url"] == "http://127.0.0.1:8265/api/prometheus/sd"
    assert sd["authorization"]["type"] == "Bearer"
    knn = [
        t for job in jobs.values() for sc in job.get("static_configs", []) for t in sc["targets"]
    ]
    assert "127.0.0.1:8000" in knn


def test_the_service_discovery_route_is_rays():
    spec = importlib.util.find_spec("ray")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("ray not installed")
    head = Path(spec.submodule_search_locations[0]) / "dashboard" / "modules" / "reporter"
    assert '@routes.get("/api/prometheus/sd")' in (head / "reporter_head.py").read_text()


# --- Dockerfiles -----------------------------------------------------------------------


@pytest.mark.parametrize("flavour", sorted(DOCKERFILES))
def test_dockerfile_basics(flavour):
    instructions = dockerfile_instructions(DOCKERFILES[flavour])
    names = [i for i, _ in instructions]
    froms = [args for i, args in instructions if i == "FROM"]
    assert froms and all(image_is_pinned(f.split()[0]) for f in froms), froms
    users = [args for i, args in instructions if i == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), users
    assert names.index("USER") > max(i for i, n in enumerate(names) if n == "RUN")
    (health,) = [args for i, args in instructions if i == "HEALTHCHECK"]
    assert "http://127.0.0.1:8000/healthz" in health and "urllib" in health
    assert "curl" not in health
    assert any(i == "EXPOSE" and "8000" in args.split() for i, args in instructions)
    assert "WORKDIR" in names and "CMD" in names


@pytest.mark.parametrize("flavour", sorted(DOCKERFILES))
def test_dockerfile_pins_every_package(flavour):
    runs = [args for i, args in dockerfile_instructions(DOCKERFILES[flavour]) if i == "RUN"]
    reqs = [r for run in runs for r in pip_requirements(run)]
    local = [r for r in reqs if r.startswith((".", "/"))]
    assert local == [f"./[{flavour}]"], local
    for req in set(reqs) - set(local):
        assert re.fullmatch(r"[A-Za-z0-9_.\-]+(\[[a-z,]+\])?==[0-9][0-9A-Za-z.+\-]*", req), req
    assert {"torch==2.14.1", "torchvision==0.29.1", "ray[train,default]==2.60.0"} <= set(reqs)
    for run in runs:
        if "apt-get install" in run:
            packages = [
                w for w in shlex.split(run.split("apt-get install", 1)[1].split("&&")[0])
                if not w.startswith("-")
            ]  # fmt: skip
            assert packages and all("=" in p for p in packages), packages


def test_cpu_image_uses_faiss_cpu_and_the_cpu_torch_index():
    text = DOCKERFILES["cpu"].read_text(encoding="utf-8")
    runs = [a for i, a in dockerfile_instructions(DOCKERFILES["cpu"]) if i == "RUN"]
    reqs = [r for run in runs for r in pip_requirements(run)]
    assert any(r.startswith("faiss-cpu==") for r in reqs)
    assert not any(r.startswith("faiss-gpu") for r in reqs)
    assert "https://download.pytorch.org/whl/cpu" in text


def test_gpu_image_installs_the_gpu_extra_and_never_faiss_cpu():
    runs = [a for i, a in dockerfile_instructions(DOCKERFILES["gpu"]) if i == "RUN"]
    reqs = [r for run in runs for r in pip_requirements(run)]
    assert "./[gpu]" in reqs
    assert any(r.startswith("faiss-gpu-cu12==") for r in reqs)
    assert not any("faiss-cpu" in r for r in reqs), reqs
    # the build fails when faiss-cpu is present
    assert any(re.search(r"if pip show faiss-cpu\b.*exit 1", run) for run in runs)


def test_gpu_extra_does_not_pull_faiss_cpu():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    gpu = project["optional-dependencies"]["gpu"]
    assert any(r.startswith("faiss-gpu") for r in gpu)
    assert not any("faiss-cpu" in r or "npid[cpu]" in r for r in gpu)
    assert not any(r.startswith("faiss") for r in project["dependencies"])


def test_dockerignore_keeps_the_build_context_small():
    text = (REPO / ".dockerignore").read_text(encoding="utf-8")
    lines = [line.strip() for line in text.splitlines() if line.strip() and line[0] != "#"]
    assert lines[0] == "*"
    for needed in ("pyproject.toml", "README.md", "trainer/", "featurestore/", "knn_service/"):
        assert f"!{needed}" in lines
