"""The Kubernetes manifests and the cluster-launcher YAML are valid and agree with the code.

- RayCluster / RayJob against the KubeRay CRDs' `openAPIV3Schema` (from `../shared/kuberay-crds`; skipped where
  absent), made strict: an object with declared properties rejects unknown keys (as `kubectl --validate=strict`).
- Core resources (Deployment, Service, PVC, Namespace) with kubernetes-validate, offline and strict.
- The launcher YAML against Ray's own `ray/autoscaler/ray-schema.json`.
- Consistency: one image everywhere, the Dockerfile that builds it, entrypoints that name existing modules and
  files, volumes that are declared, resources that fit, Ray's version equal to the installed one.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "cluster" / "kubernetes"
LAUNCHER = ROOT / "cluster" / "launcher" / "aws.yaml"
CRDS = ROOT.parent / "shared" / "kuberay-crds"
IMAGE = "h2ot-ray:0.1.0"
KUBERNETES_VERSION = "1.30.0"


def _docs() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                out.append((f"{path.name}:{doc['kind']}/{doc['metadata']['name']}", doc))
    return out


DOCS = _docs()
CUSTOM = [(n, d) for n, d in DOCS if d["apiVersion"].startswith("ray.io/")]
CORE = [(n, d) for n, d in DOCS if not d["apiVersion"].startswith("ray.io/")]


def _by_kind(kind: str) -> list[dict[str, Any]]:
    return [d for _, d in DOCS if d["kind"] == kind]


def test_expected_resources_exist() -> None:
    kinds = sorted(d["kind"] for _, d in DOCS)
    for kind in ["RayCluster", "RayJob", "Deployment", "Service", "PersistentVolumeClaim", "Namespace"]:
        assert kind in kinds, f"no {kind} in {K8S}"
    assert {d["metadata"]["name"] for d in _by_kind("RayJob")} >= {"h2ot-train"}


# --------------------------------------------------------------------------------------------- CRD schemas
def _strict(schema: Any) -> Any:
    """Copy of an OpenAPI v3 schema where objects with declared properties reject unknown keys."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@functools.cache
def _crds() -> dict[tuple[str, str], dict[str, Any]]:
    """(kind, version) -> strict openAPIV3Schema of every CRD in ../shared/kuberay-crds (parsed once)."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 2 MB of YAML
    out = {}
    for path in sorted(CRDS.glob("*.yaml")):
        crd = yaml.load(path.read_text(), Loader=loader)  # noqa: S506 (a safe loader)
        if crd.get("kind") == "CustomResourceDefinition":
            for v in crd["spec"]["versions"]:
                if v.get("served", True):
                    out[(crd["spec"]["names"]["kind"], v["name"])] = _strict(v["schema"]["openAPIV3Schema"])
    return out


def _crd_schema(kind: str, version: str) -> dict[str, Any]:
    if not CRDS.is_dir():
        pytest.skip(f"KubeRay CRDs not found at {CRDS}")
    schema = _crds().get((kind, version))
    assert schema is not None, f"no served CRD version for {kind} {version} in {CRDS}"
    return schema


@pytest.mark.parametrize("name,doc", CUSTOM, ids=[n for n, _ in CUSTOM])
def test_custom_resource_matches_kuberay_crd(name: str, doc: dict[str, Any]) -> None:
    import jsonschema

    group, version = doc["apiVersion"].split("/")
    schema = _crd_schema(doc["kind"], version)
    validator = jsonschema.Draft7Validator(schema)
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{name}: {'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


def test_strict_crd_check_catches_a_typo() -> None:
    import jsonschema

    cluster = copy.deepcopy(_by_kind("RayCluster")[0])
    cluster["spec"]["workerGroupSpecs"][0]["maxReplica"] = 4  # typo of maxReplicas
    schema = _crd_schema("RayCluster", "v1")
    assert list(jsonschema.Draft7Validator(schema).iter_errors(cluster))


# --------------------------------------------------------------------------------------------- core resources
@pytest.mark.parametrize("name,doc", CORE, ids=[n for n, _ in CORE])
def test_core_resource_is_valid(name: str, doc: dict[str, Any]) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        pytest.fail(f"{name}: {'/'.join(map(str, e.path))}: {e.message}")


def test_pod_templates_of_ray_resources_are_valid_pod_specs() -> None:
    """The RayCluster's pod templates are core PodTemplateSpecs: validate them as Pods, strictly."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    cluster = _by_kind("RayCluster")[0]
    groups = [cluster["spec"]["headGroupSpec"], *cluster["spec"]["workerGroupSpecs"]]
    for group in groups:
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}, "spec": group["template"]["spec"]}
        kubernetes_validate.validate(pod, KUBERNETES_VERSION, strict=True)


# --------------------------------------------------------------------------------------------- launcher
def test_launcher_yaml_matches_ray_schema() -> None:
    import jsonschema

    ray_schema = importlib.util.find_spec("ray.autoscaler")
    if ray_schema is None:
        pytest.skip("ray not installed")
    schema_path = Path(ray_schema.submodule_search_locations[0]) / "ray-schema.json"
    config = yaml.safe_load(LAUNCHER.read_text())
    jsonschema.validate(config, json.loads(schema_path.read_text()))
    assert config["provider"]["type"] == "aws"
    assert config["docker"]["image"] == IMAGE
    gpu = config["available_node_types"]["ray.worker.gpu"]
    assert 0 <= gpu["min_workers"] <= gpu["max_workers"] <= config["max_workers"]


# --------------------------------------------------------------------------------------------- consistency
def _pod_templates(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = doc.get("spec", {})
    if doc["kind"] == "RayCluster":
        return [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    if doc["kind"] == "Deployment":
        return [spec["template"]]
    return []


def _containers() -> list[tuple[str, dict[str, Any]]]:
    return [(name, c) for name, doc in DOCS for t in _pod_templates(doc) for c in t["spec"]["containers"]]


def test_one_image_everywhere_and_a_dockerfile_builds_it() -> None:
    images = {c["image"] for _, c in _containers()}
    assert images == {IMAGE}, images
    dockerfile = (ROOT / "cluster" / "Dockerfile").read_text()
    assert f"-t {IMAGE}" in dockerfile
    # Everything the Dockerfile copies exists (so `docker build` does not fail on a missing path).
    for line in dockerfile.splitlines():
        if line.startswith("COPY"):
            for src in shlex.split(line)[1:-1]:
                if not src.startswith("--"):
                    assert (ROOT / src).exists() or src == "README.md", f"Dockerfile copies missing {src}"


def test_ray_version_matches_installed_ray() -> None:
    ray = pytest.importorskip("ray")
    cluster = _by_kind("RayCluster")[0]
    assert cluster["spec"]["rayVersion"] == ray.__version__
    assert f"rayproject/ray:{ray.__version__}-" in (ROOT / "cluster" / "Dockerfile").read_text()


def test_containers_have_resources_that_fit() -> None:
    def qty(v: str) -> float:
        units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
        for u, f in units.items():
            if str(v).endswith(u):
                return float(str(v)[: -len(u)]) * f
        return float(v)

    for name, c in _containers():
        res = c.get("resources", {})
        assert "requests" in res and "limits" in res, f"{name}/{c['name']}: no requests/limits"
        for key, req in res["requests"].items():
            assert qty(req) <= qty(res["limits"][key]), f"{name}/{c['name']}: {key} request > limit"
    workers = _by_kind("RayCluster")[0]["spec"]["workerGroupSpecs"]
    gpu = [g for g in workers if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]]
    assert gpu, "no GPU worker group"
    for g in gpu:
        assert 0 <= g["minReplicas"] <= g.get("replicas", 0) <= g["maxReplicas"]
        assert g["maxReplicas"] >= 2, "training uses 2 workers: the group must reach 2 GPU pods"


def test_volumes_are_declared_and_claims_exist() -> None:
    claims = {d["metadata"]["name"]: d for d in _by_kind("PersistentVolumeClaim")}
    assert "ReadWriteMany" in claims["h2ot-shared"]["spec"]["accessModes"]
    for name, doc in DOCS:
        for t in _pod_templates(doc):
            volumes = {v["name"]: v for v in t["spec"].get("volumes", [])}
            for c in t["spec"]["containers"]:
                for m in c.get("volumeMounts", []):
                    assert m["name"] in volumes, f"{name}: mount {m['name']} has no volume"
            for v in volumes.values():
                if "persistentVolumeClaim" in v:
                    assert v["persistentVolumeClaim"]["claimName"] in claims, f"{name}: claim of {v['name']}"


def _entrypoint_modules(entrypoint: str) -> tuple[str, list[str]]:
    argv = shlex.split(entrypoint)
    assert argv[:2] == ["python", "-m"], f"entrypoint should be `python -m jobs.<name> ...`: {entrypoint}"
    return argv[2], argv[3:]


@pytest.mark.parametrize("job", _by_kind("RayJob"), ids=lambda j: j["metadata"]["name"])
def test_rayjob_entrypoint_points_at_existing_module_and_files(job: dict[str, Any]) -> None:
    module, args = _entrypoint_modules(job["spec"]["entrypoint"])
    path = ROOT / (module.replace(".", "/") + ".py")
    assert module.startswith("jobs.") and path.is_file(), f"{job['metadata']['name']}: no module {module}"
    # The job's own parser accepts the arguments (argparse exits 2 on an unknown option).
    mod = importlib.import_module(module)
    parser = getattr(mod, "build_parser", None) or getattr(mod, "_parser", None)
    if parser is not None:
        parser().parse_args(args)
    # /app/<x> is where the image puts the repository's files: they must exist in the repository.
    for a in args:
        if a.startswith("/app/"):
            assert (ROOT / a.removeprefix("/app/")).exists(), f"{job['metadata']['name']}: {a} not in the repo"
    # Cluster and MLflow it talks to are the ones the manifests define.
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] in {d["metadata"]["name"] for d in _by_kind("RayCluster")}
    env = yaml.safe_load(job["spec"].get("runtimeEnvYAML", "{}")) or {}
    uri = env.get("env_vars", {}).get("MLFLOW_TRACKING_URI")
    if uri:
        svc = _by_kind("Service")[0]
        assert uri == f"http://{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc.cluster.local:5000"


def test_train_config_of_rayjob_loads() -> None:
    from jobs.settings import load_train_config

    job = next(j for j in _by_kind("RayJob") if j["metadata"]["name"] == "h2ot-train")
    _, args = _entrypoint_modules(job["spec"]["entrypoint"])
    config = args[args.index("--config") + 1].removeprefix("/app/")
    overrides = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    cfg = load_train_config(ROOT / config, overrides)
    assert cfg.scaling.use_gpu is True and cfg.scaling.num_workers == 2
    assert cfg.run.storage_path.startswith("/shared/")


def test_all_in_one_namespace_with_token_auth() -> None:
    namespaces = {d["metadata"]["name"] for d in _by_kind("Namespace")}
    for name, doc in DOCS:
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") in namespaces, f"{name}: namespace"
    assert _by_kind("RayCluster")[0]["spec"]["authOptions"]["mode"] == "token"
