"""The cost benchmarks' own arithmetic: how bench/step_profile.py files ops and how
bench/epoch_cost.py reads a run (no training: a finished run's files)."""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "bench"))
import epoch_cost  # noqa: E402  (scripts of bench/, not a package)
import step_profile  # noqa: E402


@pytest.mark.parametrize("op,expected", [
    ("lazy_adam/cond_1/else/_250/lazy_adam/cond_1/Unique:Unique", "optimizer"),
    ("lazy_adam/Gather_2:ResourceGather", "optimizer"),
    ("hidden_1/Relu:_MklNativeFusedMatMul", "dense layers"),
    ("gradient_tape/hidden_1/BiasAdd/BiasAddGrad:BiasAddGrad", "dense layers"),
    ("user_embedding_1/Gather:ResourceGather", "gathers"),
    ("item_feature_tables_1/Gather:ResourceGather", "features"),
    ("multiply_bitcast_fusion", "features"),
    ("gradient_tape/concat:ConcatV2", "other")])
def test_ops_are_filed_by_what_they_do(op, expected):
  assert step_profile.category(op) == expected


def test_a_run_is_read_as_steady_state_epochs(tmp_path):
  # Epoch 1 traces and compiles (10 s); epochs 2-4 take 1, 2 and 3 s; examples/s the median
  # of theirs; the RMSE the last epoch's. A finished run (metrics.json) is not trained again.
  run = tmp_path / "run"
  run.mkdir()
  (run / "metrics.json").write_text("{}")
  epochs = [{"epoch": e, "elapsed_seconds": t, "examples_per_sec": rate,
             "eval": {"rmse": rmse}}
            for e, t, rate, rmse in ((1, 10.0, 5.0, 1.2), (2, 11.0, 90.0, 1.0),
                                     (3, 13.0, 45.0, 0.95), (4, 16.0, 30.0, 0.9))]
  (run / "history.json").write_text(json.dumps({"epochs": epochs}))
  result = epoch_cost.run("unused", "unused.flags", "unused", str(run), 0)
  assert result == {"seconds_per_epoch": pytest.approx(2.0), "examples_per_sec": 45.0,
                    "rmse": 0.9, "epochs": 4}
