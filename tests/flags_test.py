"""The command lines' flags are the config's fields: one each, with today's names and defaults;
importing every command line in one process works."""

import dataclasses
import json
import subprocess
import sys

import pytest
from absl import flags

from conftest import REPO_ROOT, run_python
from trainer import cli, config

FIXTURES = REPO_ROOT / "tests" / "fixtures" / "before_redesign"
CONFIGS = [(config.TrainConfig, "task"), (config.PrepareConfig, "prepare")]


def _defined(config_class) -> flags.FlagValues:
  flag_values = flags.FlagValues()
  cli.define_flags(config_class, flag_values)
  return flag_values


@pytest.mark.parametrize("config_class,module", CONFIGS, ids=["train", "prepare"])
def test_every_field_has_a_flag_and_earlier_flags_keep_name_and_default(config_class, module):
  before = json.loads((FIXTURES / f"{module}_flags.json").read_text())
  defined = _defined(config_class)
  names = {cli.flag_name(f) for f in dataclasses.fields(config_class)}
  assert set(defined) == names  # every field a flag, every flag a field
  assert set(before) <= names  # flags are added, never renamed or removed
  for name, was in before.items():
    flag = defined[name]
    default = list(flag.default) if isinstance(flag.default, (list, tuple)) else flag.default
    enum = sorted(flag.parser.enum_values) if hasattr(flag.parser, "enum_values") else None
    now = {"default": default, "type": flag.flag_type(),
           "enum": [v for v in enum if v in was["enum"]] if enum and was["enum"] else enum}
    assert now == was, name  # (an enumeration may gain values, never lose one)


@pytest.mark.parametrize("name,values", [("model", config.MODELS), ("task", config.TASKS)])
def test_enumeration_help_names_every_value(name, values):
  help_text = _defined(config.TrainConfig)[name].help
  assert all(value in help_text for value in values), help_text


def test_flags_build_the_config_they_name(tmp_path):
  flagfile = tmp_path / "recipe.flags"
  flagfile.write_text("--model=neumf\n--layers=16,8\n--noexclude_positives\n--task=implicit\n")
  built = cli.parse_config(config.TrainConfig, [
      "neumf-train", f"--flagfile={flagfile}", "--data_dir=d", "--model_dir=gs://b/m",
      "--tensorboard_dir=gs://b/tb", "--batch_size=50", "--l2=0.5"])
  assert built == config.TrainConfig(
      data_dir="d", model_dir="gs://b/m", log_dir="gs://b/tb", model="neumf", layers=(16, 8),
      exclude_positives=False, task="implicit", batch_size=50, l2=0.5)
  prepared = cli.parse_config(config.PrepareConfig, [
      "neumf-prepare", "--output_dir=o", "--source=csv", "--input=a.csv,b.csv",
      "--user_column=u", "--item_column=i", "--delimiter=tab"])
  assert prepared.input == ("a.csv", "b.csv") and prepared.delimiter == "\t"
  with pytest.raises(config.ConfigError, match=r"--layers=8,x must be integers, e\.g\. "
                     r"64,32,16,8"):
    cli.parse_config(config.TrainConfig, ["t", "--data_dir=d", "--model_dir=m",
                                          "--layers=8,x"])
  with pytest.raises(flags.IllegalFlagValueError, match="epochs"):
    cli.parse_config(config.TrainConfig, ["t", "--data_dir=d", "--model_dir=m", "--epochs=0"])


def test_an_environment_variable_gives_a_default(monkeypatch):
  monkeypatch.setenv("AIP_MODEL_DIR", "gs://bucket/vertex")
  built = cli.parse_config(config.TrainConfig, ["t", "--data_dir=d"])
  assert built.model_dir == "gs://bucket/vertex"


def test_every_command_line_imports_into_one_process():
  code = ("import trainer.task, trainer.prepare, trainer.recommend\n"
          "from trainer import cli, config\n"
          "cli.parse_config(config.TrainConfig, ['t', '--data_dir=d', '--model_dir=m', "
          "'--seed=3'])\n"
          "cli.parse_config(config.PrepareConfig, ['p', '--output_dir=o', '--seed=4'])\n")
  run_python(code)


def test_help_shows_the_flags_of_the_command_line():
  result = subprocess.run([sys.executable, "-m", "trainer.task", "--helpshort"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)
  assert "--model: <seed_mlp|gmf|mlp|neumf|mf|autorec>" in result.stdout, result.stdout[-2000:]
  assert "--tensorboard_dir" in result.stdout and "--data_dir" in result.stdout
