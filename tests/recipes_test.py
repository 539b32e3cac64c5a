"""Every recipe (configs/*.flags) says the preparation it expects, and both halves parse."""

import shlex

import pytest

from conftest import REPO_ROOT
from trainer import cli
from trainer.config import PrepareConfig, TrainConfig

RECIPES = sorted((REPO_ROOT / "configs").glob("*.flags"))
PREFIX = "# prepare: "


def test_there_are_recipes():
  assert len(RECIPES) >= 5


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_a_recipe_starts_with_its_preparation_and_both_parse(recipe):
  first = recipe.read_text().splitlines()[0]
  assert first.startswith(PREFIX), f"{recipe.name}: the first line is not {PREFIX!r}..."
  flags = shlex.split(first[len(PREFIX):])
  assert not any(f.startswith(("--input=", "--output_dir=", "--eval_input=")) for f in flags), (
      "input and output paths are the user's to give")
  paths = ["--output_dir=out", "--input=ratings"]
  if "--split=given" in flags:
    paths.append("--eval_input=held_out")
  prepare = cli.parse_config(PrepareConfig, ["neumf-prepare", *flags, *paths])
  assert prepare.source == "movielens"
  train = cli.parse_config(TrainConfig, ["neumf-train", f"--flagfile={recipe}",
                                         "--data_dir=d", "--model_dir=m"])
  assert train.epochs >= 1
