"""Quality against the peers users pick instead, on one prepared split: a table and a plot.

  pip install -e ".[bench]"      # the peers: scikit-surprise, implicit (bench-only)
  python bench/quality.py --movielens_dir=ml-100k --task=explicit --output_dir=runs/q/explicit
  python bench/quality.py --movielens_dir=ml-100k --task=implicit --output_dir=runs/q/implicit
  python bench/quality.py --data_dir=runs/small/folds/fold1/data --task=implicit \
      --output_dir=runs/q/fold1          # a directory prepared already (a validation fold)

Prepares the split once (explicit: a random 90/10 split with the side files; implicit: the NCF
protocol, leave-one-out with 99 sampled negatives, users with at least 20 interactions), then
exports it with raw IDs (`split_export.py`: row counts and checksums printed), so the peers fit
on exactly our training rows and are judged on our eval rows. Each of our recipes (`configs/`)
and each peer runs once per seed; a row of the table is the metric's mean and range over the
seeds, the training wall time, and how long our runs took to reach the best peer's metric
(from `history.json`: training plus evaluation up to the end of that epoch). Explicit:
Surprise's SVD and SVD++ (their defaults), RMSE of the clipped prediction, and I-AutoRec
(`autorec.py`: a published model no library packages, shown as a reference); implicit: the
`implicit` library's ALS and BPR and popularity, HR@10 and NDCG@10 under both protocols with
ties counted against the model as our evaluation does. Writes `quality.md`, `quality.json` and
`quality.png` (metric against training time, one point per run) to --output_dir.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Dict, List, Optional

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))
import autorec  # noqa: E402
import split_export  # noqa: E402

K = 10
RMSE_TARGET = 0.935  # Surprise SVD's published ML-100K figure: the time-to-accuracy target
OURS = {
    "explicit": {"autorec + item features": ["--flagfile=configs/ml100k_explicit.flags"],
                 "autorec, IDs only": ["--flagfile=configs/ml100k_explicit.flags",
                                       "--features=none"],
                 "mf + features": ["--flagfile=configs/ml100k_explicit_mf.flags"],
                 "mf, IDs only": ["--flagfile=configs/ml100k_explicit_mf.flags",
                                  "--features=none"]},
    "implicit": {"neumf + features": ["--flagfile=configs/ml100k_implicit.flags"],
                 "neumf, IDs only": ["--flagfile=configs/ml100k_implicit.flags",
                                     "--features=none"],
                 "gmf": ["--flagfile=configs/ml100k_implicit.flags", "--model=gmf"],
                 "mf (BPR)": ["--flagfile=configs/ml100k_implicit.flags", "--model=mf",
                              "--task=implicit_bpr", "--embedding_dim=32"],
                 "mf + history (softmax), latest-small recipe": [
                     "--flagfile=configs/latest_small_implicit.flags"],
                 "mf (softmax), no history": [
                     "--flagfile=configs/latest_small_implicit.flags", "--history=0",
                     "--epochs=20", "--l2=0.02"]},
}


def side_files(movielens_dir: str) -> List[str]:
  items = [f for f in ("u.item", "movies.dat", "movies.csv")
           if os.path.exists(os.path.join(movielens_dir, f))]
  users = [f for f in ("u.user", "users.dat") if os.path.exists(os.path.join(movielens_dir, f))]
  return ([f"--item_features={os.path.join(movielens_dir, items[0])}"] if items else []) + (
      [f"--user_features={os.path.join(movielens_dir, users[0])}"] if users else [])


def prepare(movielens_dir: str, task: str, data_dir: str) -> None:
  log = next(os.path.join(movielens_dir, f) for f in ("u.data", "ratings.dat", "ratings.csv")
             if os.path.exists(os.path.join(movielens_dir, f)))
  split = (["--eval_fraction=0.1"] if task == "explicit" else
           ["--split=leave_one_out", "--eval_negatives=99", "--min_user_interactions=20"])
  _run([sys.executable, "-m", "trainer.prepare", "--source=movielens", f"--input={log}",
        f"--output_dir={data_dir}", "--seed=0", *split, *side_files(movielens_dir)])


def _run(command: List[str]) -> str:
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=ROOT)
  done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
  if done.returncode:
    raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
  return done.stdout


def train_ours(flags: List[str], data_dir: str, model_dir: str, seed: int) -> Dict:
  """One run of the trainer; its metrics, history and wall time."""
  started = time.time()
  _run([sys.executable, "-m", "trainer.task", *flags, f"--data_dir={data_dir}",
        f"--model_dir={model_dir}", f"--seed={seed}", "--overwrite",
        "--checkpoint_every_secs=0", "--log_every_steps=100000"])
  with open(os.path.join(model_dir, "metrics.json")) as f:
    result = json.load(f)
  with open(os.path.join(model_dir, "history.json")) as f:
    result["history"] = json.load(f)["epochs"]
  result["process_seconds"] = time.time() - started
  result["train_seconds"] = result["history"][-1]["elapsed_seconds"]
  return result


# ----------------------------------------------------------------------------- peers


def fit_surprise(name: str, split_dir: str, seed: int, rating_range) -> Dict:
  import surprise
  reader = surprise.Reader(line_format="user item rating timestamp", sep=",", skip_lines=1,
                           rating_scale=rating_range)
  trainset = surprise.Dataset.load_from_file(os.path.join(split_dir, "train.csv"),
                                             reader).build_full_trainset()
  held_out = list(split_export.read_csv_rows(os.path.join(split_dir, "eval.csv")))
  algorithm = {"SVD": surprise.SVD, "SVD++": surprise.SVDpp}[name](random_state=seed)
  started = time.time()
  algorithm.fit(trainset)
  seconds = time.time() - started
  errors = np.array([algorithm.predict(u, i).est - r for u, i, r in held_out])
  return {"eval_rmse": float(np.sqrt(np.mean(errors ** 2))),
          "eval_mae": float(np.mean(np.abs(errors))), "train_seconds": seconds}


def _interactions(split_dir: str):
  """Training interactions as a CSR users x items matrix, and the eval rows with their
  sampled negatives, in its indices."""
  import csv
  from scipy import sparse
  train = list(split_export.read_csv_rows(os.path.join(split_dir, "train.csv")))
  with open(os.path.join(split_dir, "eval_negatives.csv"), newline="") as f:
    held_out = [(r["user"], r["item"], r["negatives"].split("|")) for r in csv.DictReader(f)]
  users = {u: n for n, u in enumerate(sorted({u for u, _, _ in train} |
                                             {u for u, _, _ in held_out}))}
  items = {i: n for n, i in enumerate(sorted({i for _, i, _ in train} | {
      i for _, i, _ in held_out} | {j for _, _, js in held_out for j in js}))}
  matrix = sparse.csr_matrix((np.ones(len(train), np.float32),
                              ([users[u] for u, _, _ in train], [items[i] for _, i, _ in train])),
                             shape=(len(users), len(items)))
  rows = [(users[u], items[i], [items[j] for j in js]) for u, i, js in held_out]
  return matrix, rows


def ranking_metrics(scores: np.ndarray, matrix, rows) -> Dict[str, float]:
  """HR@K, NDCG@K of scores [users, items], both protocols, ties against the model."""
  out = {"hr_sampled": [], "ndcg_sampled": [], "hr_full": [], "ndcg_full": []}
  for user, item, negatives in rows:
    s = scores[user]
    seen = matrix.indices[matrix.indptr[user]:matrix.indptr[user + 1]]
    competitors = np.ones(len(s), bool)
    competitors[seen] = False
    competitors[item] = False
    for protocol, rank in (("sampled", int(np.sum(s[negatives] >= s[item]))),
                           ("full", int(np.sum(s[competitors] >= s[item])))):
      out[f"hr_{protocol}"].append(rank < K)
      out[f"ndcg_{protocol}"].append(1 / np.log2(rank + 2) if rank < K else 0.0)
  return {f"eval_{name}": float(np.mean(values)) for name, values in out.items()}


def fit_implicit(name: str, split_dir: str, seed: int) -> Dict:
  matrix, rows = _interactions(split_dir)
  started = time.time()
  if name == "popularity":
    popularity = np.asarray(matrix.sum(axis=0)).ravel()
    scores = np.tile(popularity, (matrix.shape[0], 1))
  else:
    import implicit
    model = (implicit.cpu.als.AlternatingLeastSquares(factors=64, regularization=0.05,
                                                      iterations=15, random_state=seed)
             if name == "implicit ALS" else
             implicit.cpu.bpr.BayesianPersonalizedRanking(factors=64, iterations=100,
                                                          random_state=seed))
    model.fit(matrix, show_progress=False)
    scores = model.user_factors @ model.item_factors.T
  seconds = time.time() - started
  return {**ranking_metrics(scores, matrix, rows), "train_seconds": seconds}


PEERS = {"explicit": ("SVD", "SVD++"), "implicit": ("implicit ALS", "implicit BPR", "popularity")}
# Published models that no library packages: shown beside the peers, not raced ("best peer").
REFERENCES = {"explicit": ("I-AutoRec",), "implicit": ()}
PRIMARY = {"explicit": "eval_rmse", "implicit": "eval_hr_full"}


def peers_available(task: str) -> Optional[str]:
  """None when the peers import, else what to install."""
  try:
    __import__("surprise" if task == "explicit" else "implicit")
  except ImportError:
    return ("the peers are bench-only extras: pip install -e \".[bench]\" "
            "(scikit-surprise, implicit)")
  return None


# ----------------------------------------------------------------------------- report


def summarize(runs: Dict[str, List[Dict]], task: str) -> List[Dict]:
  """One row per method: mean and range over seeds of each metric, time, time to target."""
  primary = PRIMARY[task]
  lower = task == "explicit"
  peer_values = [np.mean([r[primary] for r in rs]) for m, rs in runs.items()
                 if m in PEERS[task] and m != "popularity"]
  best_peer = (min if lower else max)(peer_values) if peer_values else None
  metrics = (["eval_rmse", "eval_mae"] if task == "explicit" else
             ["eval_hr_full", "eval_ndcg_full", "eval_hr_sampled", "eval_ndcg_sampled",
              "eval_hr_corrected_sampled"])
  rows = []
  for method, results in runs.items():
    row = {"method": method, "seeds": len(results),
           "train_seconds": float(np.mean([r["train_seconds"] for r in results]))}
    for m in metrics:
      values = [r[m] for r in results if m in r]
      if values:
        row[m] = (float(np.mean(values)), float(np.min(values)), float(np.max(values)))
    targets = {"best peer": best_peer, **({"rmse 0.935": RMSE_TARGET} if lower else {})}
    for label, target in targets.items():
      row[f"time to {label}"] = _time_to(results, primary, target, lower)
    rows.append(row)
  return rows


def _time_to(results: List[Dict], metric: str, target: Optional[float],
             lower: bool) -> Optional[float]:
  """Mean seconds to reach `target` over the runs that reached it (None if none did)."""
  if target is None:
    return None
  name = metric[len("eval_"):]
  times = []
  for r in results:
    if "history" in r:
      first = next((e["elapsed_seconds"] for e in r["history"]
                    if (e["eval"][name] <= target if lower else e["eval"][name] >= target)),
                   None)
    else:  # a peer: its fit time, if its final metric reached the target
      first = r["train_seconds"] if (r[metric] <= target if lower else r[metric] >= target) \
          else None
    if first is not None:
      times.append(first)
  return float(np.mean(times)) if times else None


def table(rows: List[Dict], task: str) -> str:
  metrics = [m for m in rows[0] if m.startswith("eval_")]
  timers = [m for m in rows[0] if m.startswith("time to")]
  head = ["method", "seeds", *[m[len("eval_"):] for m in metrics], "train s", *timers]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for row in rows:
    cells = [row["method"], str(row["seeds"])]
    cells += [f"{row[m][0]:.4f} ({row[m][1]:.4f}-{row[m][2]:.4f})" if m in row else "-"
              for m in metrics]
    cells.append(f"{row['train_seconds']:.1f}")
    cells += [f"{row[t]:.1f}" if row.get(t) is not None else "not reached" for t in timers]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def plot(runs: Dict[str, List[Dict]], task: str, path: str, title: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt
  primary = PRIMARY[task]
  figure, axes = plt.subplots(figsize=(8, 5), constrained_layout=True)
  for method, results in runs.items():
    axes.scatter([r["train_seconds"] for r in results], [r[primary] for r in results],
                 label=method,
                 marker="o" if method not in PEERS[task] + REFERENCES[task] else "s")
  axes.set(xscale="log", xlabel="training wall time, s (log)", ylabel=primary[len("eval_"):],
           title=title)
  axes.legend(fontsize="small")
  figure.savefig(path, dpi=90)
  plt.close(figure)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--movielens_dir", help="ml-100k or ml-latest-small")
  parser.add_argument("--data_dir", help="instead of --movielens_dir: a directory prepared "
                      "already, e.g. a validation fold of bench/validation_folds.py")
  parser.add_argument("--task", choices=sorted(OURS), required=True)
  parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
  parser.add_argument("--output_dir", required=True)
  parser.add_argument("--methods", nargs="*", help="a subset of ours and the peers")
  args = parser.parse_args()
  if bool(args.movielens_dir) == bool(args.data_dir):
    parser.error("give one of --movielens_dir and --data_dir")
  missing = peers_available(args.task)
  if missing:
    print(f"NOTE: {missing}; running this project's models only", flush=True)
  data_dir, split_dir = (os.path.join(args.output_dir, d) for d in ("data", "split"))
  if args.data_dir:
    data_dir = args.data_dir
  else:
    prepare(args.movielens_dir, args.task, data_dir)
  for name, (rows, digest) in split_export.export_split(data_dir, split_dir).items():
    print(f"split {name}: {rows} rows {digest[:16]}", flush=True)
  metadata = json.load(open(os.path.join(data_dir, "metadata.json")))
  runs: Dict[str, List[Dict]] = {}
  methods = (list(OURS[args.task]) + ([] if missing else list(PEERS[args.task]))
             + list(REFERENCES[args.task]))
  for method in [m for m in methods if not args.methods or m in args.methods]:
    for seed in args.seeds:
      if method in OURS[args.task]:
        result = train_ours(OURS[args.task][method], data_dir, os.path.join(
            args.output_dir, "runs", f"{method.split()[0]}-{len(runs)}-{seed}"), seed)
      elif method == "I-AutoRec":
        result = autorec.fit(split_dir, seed, (metadata["rating_min"], metadata["rating_max"]))
      elif args.task == "explicit":
        result = fit_surprise(method, split_dir, seed,
                              (metadata["rating_min"], metadata["rating_max"]))
      else:
        result = fit_implicit(method, split_dir, seed)
      runs.setdefault(method, []).append(result)
      print(f"{method} seed {seed}: {PRIMARY[args.task]} {result[PRIMARY[args.task]]:.4f} in "
            f"{result['train_seconds']:.1f} s", flush=True)
  rows = summarize(runs, args.task)
  title = (f"{os.path.normpath(args.data_dir or os.path.basename(args.movielens_dir))}, "
           f"{args.task}")
  text = f"{title}, seeds {args.seeds}\n\n{table(rows, args.task)}\n"
  print("\n" + text)
  with open(os.path.join(args.output_dir, "quality.md"), "w") as f:
    f.write(text)
  with open(os.path.join(args.output_dir, "quality.json"), "w") as f:
    json.dump({"rows": rows, "runs": {m: [{k: v for k, v in r.items() if k != "history"}
                                          for r in rs] for m, rs in runs.items()}}, f, indent=1)
  plot(runs, args.task, os.path.join(args.output_dir, "quality.png"), title)


if __name__ == "__main__":
  main()
