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
