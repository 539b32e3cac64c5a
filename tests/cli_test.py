"""End to end through the real command lines, each in a fresh process."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, last_json_line, run_cli, shared_file

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
  """prepare -> train on two logical CPUs -> export, through the CLIs."""
  root = tmp_path_factory.mktemp("cli")
  data_dir, model_dir = str(root / "data"), str(root / "model")
  prepared = last_json_line(run_cli(
      "trainer.prepare", "--source=synthetic", f"--output_dir={data_dir}", "--num_users=200",
      "--num_items=120", "--num_ratings=8000", "--num_shards=2", "--seed=3").stdout)
  result = run_cli("trainer.task", f"--data_dir={data_dir}", f"--model_dir={model_dir}",
                   "--num_cpu_devices=2", "--epochs=5", "--batch_size=128",
                   "--learning_rate=0.003", "--embedding_dim=16", "--hidden_units=32")
  return data_dir, model_dir, prepared, last_json_line(result.stdout), result.stderr


def test_training_cli_beats_the_global_mean_on_two_replicas(pipeline_run):
  _, model_dir, prepared, metrics, log = pipeline_run
  assert prepared["num_train"] + prepared["num_eval"] == 8000
  assert metrics["replicas"] == 2
  assert metrics["eval_rmse"] < metrics["eval_rmse_global_mean_baseline"]
  assert "examples/s" in log and "ETA" in log and " rmse " in log and "baseline_rmse" in log
  with open(os.path.join(model_dir, "metrics.json")) as f:
    assert json.load(f) == metrics


def test_recommend_cli_prints_k_distinct_known_items(pipeline_run):
  data_dir, model_dir, _, _, _ = pipeline_run
  out = run_cli("trainer.recommend", f"--export_dir={model_dir}/export", "--user=u5",
                "--k=7").stdout
  lines = out.strip().splitlines()
  assert lines[0] == "Top 7 for user u5"
  items = [line.split()[1] for line in lines[1:]]
  with open(os.path.join(data_dir, "items.vocab")) as f:
    known = set(f.read().split())
  assert len(items) == 7 and len(set(items)) == 7 and set(items) <= known
  scores = [float(line.split()[2]) for line in lines[1:]]
  assert scores == sorted(scores, reverse=True)


def test_recommend_cli_recent_needs_a_model_with_a_history(pipeline_run):
  _, model_dir, _, _, _ = pipeline_run
  result = run_cli("trainer.recommend", f"--export_dir={model_dir}/export", "--user=u5",
                   "--recent=i1,i2", check=False)
  assert result.returncode == 2
  assert "no 'recommend_recent' signature (--recent needs a model trained with --history)" in (
      result.stderr)


def test_saved_model_cli_sees_and_runs_both_signatures(pipeline_run):
  cli = shutil.which("saved_model_cli")
  if cli is None:
    pytest.skip("saved_model_cli is not on PATH (it comes with the tensorflow package)")
  _, model_dir, _, _, _ = pipeline_run
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  shown = subprocess.run([cli, "show", "--dir", f"{model_dir}/export", "--all"], env=env,
                         capture_output=True, text=True, check=True).stdout
  assert "signature_def['serving_default']" in shown
  assert "signature_def['recommend']" in shown
  # The session-based loader (as TF Serving uses) must find every variable.
  ran = subprocess.run([cli, "run", "--dir", f"{model_dir}/export", "--tag_set", "serve",
                        "--signature_def", "recommend", "--input_exprs",
                        'user=["u5"];k=3'], env=env, capture_output=True, text=True)
  assert ran.returncode == 0, ran.stderr[-3000:]
  assert "Result for output key items" in ran.stdout


@pytest.mark.parametrize("flag,message", [
    ("--batch_size=-5", "flag --batch_size=-5"),
    ("--model=transformer", "flag --model=transformer"),
    ("--epochs=0", "flag --epochs=0"),
])
def test_bad_training_flags_fail_at_start_up(tmp_path, flag, message):
  result = run_cli("trainer.task", f"--data_dir={tmp_path}", f"--model_dir={tmp_path}/m", flag,
                   check=False, timeout=120)
  assert result.returncode != 0
  assert message in result.stderr
  assert not os.path.exists(f"{tmp_path}/m")


def test_missing_data_dir_fails_naming_the_flag(tmp_path):
  result = run_cli("trainer.task", f"--model_dir={tmp_path}/m", check=False, timeout=120)
  assert result.returncode != 0
  assert "--data_dir" in result.stderr
  result = run_cli("trainer.task", f"--data_dir={tmp_path}/nothing", f"--model_dir={tmp_path}/m",
                   check=False, timeout=120)
  assert result.returncode == 2
  assert f"--data_dir='{tmp_path}/nothing' is not a prepared data directory" in result.stderr


def test_bad_input_file_fails_naming_file_and_line(tmp_path):
  bad = tmp_path / "u.data"
  bad.write_text("1\t2\t3\t881250949\n1\t3\tfive\t881250949\n")
  result = run_cli("trainer.prepare", "--source=movielens", f"--input={bad}",
                   f"--output_dir={tmp_path}/out", check=False, timeout=120)
  assert result.returncode == 2
  assert f"{bad}:2: rating 'five' is not a number" in result.stderr
  assert not os.path.exists(f"{tmp_path}/out/metadata.json")


def test_movielens_100k_two_epochs_reach_rmse_below_one(tmp_path):
  u_data = shared_file("ml-100k/u.data")
  run_cli("trainer.prepare", "--source=movielens", f"--input={u_data}",
          f"--output_dir={tmp_path}/data", "--eval_fraction=0.2", "--seed=1")
  metrics = last_json_line(run_cli(
      "trainer.task", f"--data_dir={tmp_path}/data", f"--model_dir={tmp_path}/model",
      "--model=seed_mlp", "--epochs=2", "--batch_size=256").stdout)
  assert metrics["epochs"] == 2
  assert abs(metrics["eval_examples"] - 20000) < 600  # a hash-random 20%
  assert metrics["eval_rmse"] < 1.0, metrics


def test_vertex_ai_directory_variables_are_the_defaults(pipeline_run, tmp_path):
  data_dir = pipeline_run[0]
  env = {"AIP_MODEL_DIR": str(tmp_path / "model"), "AIP_CHECKPOINT_DIR": str(tmp_path / "ckpt"),
         "AIP_TENSORBOARD_LOG_DIR": str(tmp_path / "tb")}
  run_cli("trainer.task", f"--data_dir={data_dir}", "--epochs=1", "--batch_size=512",
          "--embedding_dim=8", "--hidden_units=8", env=env)
  assert os.path.exists(tmp_path / "model" / "metrics.json")
  assert os.path.exists(tmp_path / "model" / "export" / "saved_model.pb")
  assert any(n.startswith("ckpt-1") for n in os.listdir(tmp_path / "ckpt"))
  assert any(n.startswith("events.") for n in os.listdir(tmp_path / "tb"))


def test_prepare_cli_reads_csv_with_leave_one_out_and_negatives(tmp_path):
  log = tmp_path / "events.tsv"
  log.write_text("".join(f"user{k % 9}\titem{(k * 7) % 23}\t{k}\n" for k in range(120)))
  out = last_json_line(run_cli(
      "trainer.prepare", "--source=csv", f"--input={tmp_path}/*.tsv", "--delimiter=tab",
      "--noheader", "--user_column=0", "--item_column=1", "--timestamp_column=2",
      "--split=leave_one_out", "--eval_negatives=5", "--duplicates=keep_latest",
      f"--output_dir={tmp_path}/out", "--num_shards=2").stdout)
  assert out["split"] == "leave_one_out" and out["num_eval"] == 9
  with open(tmp_path / "out" / "metadata.json") as f:
    metadata = json.load(f)
  assert metadata["implicit"] and metadata["eval_negatives"] == 5
  assert os.path.exists(tmp_path / "out" / "eval_negatives.npz")


_PARSE_FLAGFILE = """
import json, sys
from trainer import cli, config
config = cli.parse_config(config.TrainConfig, [sys.argv[0], "--flagfile=" + sys.argv[1],
                                               "--data_dir=d", "--model_dir=m"])
print(json.dumps({"model": config.model, "task": config.task, "features": config.features}))
"""


@pytest.mark.parametrize("name,model,task,features", [
    ("ml100k_explicit", "autorec", "explicit", "genres,year"),
    ("ml100k_explicit_mf", "mf", "explicit", "all"),
    ("ml100k_implicit", "neumf", "implicit", "all"),
    ("latest_small_implicit", "mf", "implicit_softmax", "all")])
def test_the_recipes_are_valid_flagfiles_of_model_flags_only(name, model, task, features):
  path = REPO_ROOT / "configs" / f"{name}.flags"
  flags = [line.split("=")[0] for line in path.read_text().splitlines()
           if line.startswith("--")]
  assert not {"--data_dir", "--model_dir", "--export_dir"} & set(flags)  # given per run
  result = subprocess.run([sys.executable, "-c", _PARSE_FLAGFILE, str(path)], cwd=REPO_ROOT,
                          capture_output=True, text=True, check=True)
  assert json.loads(result.stdout.strip().splitlines()[-1]) == {
      "model": model, "task": task, "features": features}
