"""Puts our accuracies beside PFLlib's published Fashion-MNIST table.

  python experiments/compare.py --flagfile=pfllib_fmnist.flags --num_rounds=12 --seeds=0 \
      --algorithms=fedavg,fedprox,fedgen,ditto,fedrep,apfl_deng --out=docs/results/pfllib_dir
  python experiments/compare.py --flagfile=pfllib_fmnist.flags --num_rounds=12 --seeds=0 \
      --algorithms=apfl_deng --sweep=apfl_deng_alpha:1.0 --out=docs/results/pfllib_dir
  python experiments/compare.py --flagfile=pfllib_fmnist_pat.flags --num_rounds=12 \
      --seeds=0 --algorithms=fedavg,ditto,fedrep --out=docs/results/pfllib_pat
  python experiments/pfllib_check.py \
      --runs=dirichlet:docs/results/pfllib_dir,pathological:docs/results/pfllib_pat \
      --report=docs/results/pfllib/results.md

PFLlib (benchmark page of its documentation) reports, for 20 clients, each client's data
split 75/25 train/test, batch 10, 1 local epoch, the 4-layer CNN, the best test accuracy
over its rounds, sample-weighted over clients. Our counterpart is the best
`personalized_acc_weighted` over the evaluated rounds (for FedAvg, FedProx and FedGen the
personalized model is the global one, as in PFLlib's evaluation). Runs are read from
<folder>/runs/<algorithm>[/<flag>=<value>]/seed<k>/ as compare.py writes them, finished or
still running; a run whose config is not PFLlib's setting is refused with the flag that
differs. That includes PFLlib's defaults where ours follow the papers (ALGORITHM_SETTING:
FedRep's 1 head epoch, FedGen's PFLlib-style regulariser and generator optimizer), which
`pfllib_fmnist*.flags` pin; a config.json from before such a flag existed had PFLlib's
behaviour (BEFORE_FLAG).
"""

import os
import shlex
import sys
from typing import Any

from absl import flags
import numpy as np

from apfl_jax.core.errors import UserError
from apfl_jax.runner import run_folder
from apfl_jax.studies import plots, results

# PFLlib's published test accuracy (%) on Fashion-MNIST, by partition and algorithm
# ('apfl_deng' is PFLlib's APFL, the adaptive mixing of Deng et al. 2020).
PUBLISHED = {
  'dirichlet': {
    'fedavg': 85.85,
    'fedprox': 85.63,
    'fedgen': 84.90,
    'ditto': 97.47,
    'fedrep': 97.56,
    'apfl_deng': 97.25,
  },
  'pathological': {'fedavg': 80.41, 'ditto': 99.44, 'fedrep': 99.56},
}
# The flags of PFLlib's setting, common to both partitions, then per partition.
SETTING = {
  'dataset': 'fashion_mnist',
  'model': 'cnn',
  'num_clients': 20,
  'test_split': 'pooled',
  'client_train_fraction': 0.75,
  'batch_size': 10,
  'learning_rate': 0.005,
  'client_optimizer': 'sgd',
  'local_epochs': 1,
  'local_steps': 0,
  'join_ratio': 1.0,
  'server': 'sync',
  'eval_every': 1,
}
PARTITION_SETTING: dict[str, dict[str, Any]] = {
  'dirichlet': {'partition': 'dirichlet', 'dirichlet_alpha': 0.1},
  'pathological': {'partition': 'pathological', 'classes_per_client': 2},
}
# PFLlib's defaults for the algorithms whose own defaults here follow their papers.
ALGORITHM_SETTING: dict[str, dict[str, Any]] = {
  'fedrep': {'fedrep_head_epochs': 1},
  'fedgen': {
    'fedgen_regularizer': 'pfllib',
    'fedgen_alpha': 1.0,
    'fedgen_generator_weight_decay': 0.0,
    'fedgen_generator_lr_decay': 1.0,
  },
}
# What a config.json written before a flag existed means: the behaviour of the code then.
BEFORE_FLAG = {
  'fedrep_head_epochs': 1,
  'fedgen_regularizer': 'pfllib',
  'fedgen_generator_weight_decay': 0.0,
  'fedgen_generator_lr_decay': 1.0,
}
METRIC = 'personalized_acc_weighted'
HEADER = [
  "# Fashion-MNIST: our runs beside PFLlib's published table",
  '',
  '- Setting (both sides): 20 clients, train and test pooled then split 75/25 per client, '
  'FedAvgCNN, SGD lr 0.005, batch 10, 1 local epoch, every client every round.',
  '- Metric: best test accuracy over the evaluated rounds, sample-weighted over clients '
  f'(our `{METRIC}`, evaluated every round). PFLlib ran up to 2000 rounds; ours ran '
  'the rounds in the "rounds run" column, so our "best" is a lower bound of what the '
  "same run would reach with PFLlib's round budget.",
]


def define_flags() -> None:
  """Defines the command line of experiments/pfllib_check.py (once per process)."""
  if 'runs' in flags.FLAGS:
    return
  flags.DEFINE_list(
    'runs',
    [],
    f'PARTITION:FOLDER pairs, PARTITION in {", ".join(PUBLISHED)}, FOLDER a compare.py '
    '--out folder.',
  )
  flags.DEFINE_string(
    'report',
    '',
    'The Markdown file to write (the table is printed as well); '
    'accuracy_vs_round_<partition>.png go beside it.',
  )


class CheckError(ValueError):
  """A run that cannot be compared with PFLlib's table."""


def parse_runs(specs: list[str]) -> list[tuple[str, str]]:
  """['dirichlet:folder', ...] -> [(partition, folder)]."""
  pairs = []
  for spec in specs:
    partition, _, folder = spec.partition(':')
    if partition not in PUBLISHED or not folder:
      raise CheckError(
        f'--runs: expected PARTITION:FOLDER with PARTITION in {", ".join(PUBLISHED)}; got {spec!r}'
      )
    pairs.append((partition, folder))
  if not pairs:
    raise CheckError('--runs is empty')
  return pairs


def check_setting(config: dict[str, Any], partition: str, path: str) -> None:
  """Raises CheckError naming the first flag of `config` that is not PFLlib's."""
  setting = {
    **SETTING,
    **PARTITION_SETTING[partition],
    **ALGORITHM_SETTING.get(str(config.get('algorithm')), {}),
  }
  for name, value in setting.items():
    found = config.get(name, BEFORE_FLAG.get(name))
    if found != value:
      raise CheckError(
        f"{path}: --{name}={found} but PFLlib's {partition} setting has --{name}={value}"
      )


def read_run(workdir: str, partition: str) -> dict[str, Any] | None:
  """Best and final METRIC of one run folder, or None if it has no evaluated round yet."""
  config = run_folder.read_config_values(workdir)
  check_setting(config, partition, os.path.join(workdir, run_folder.CONFIG))
  rows = run_folder.read_metrics(workdir)
  evaluated = [(r[METRIC], r['round']) for r in rows if r.get(METRIC) is not None]
  if not evaluated:
    return None
  best, best_round = max(evaluated)
  return {
    'algorithm': config['algorithm'],
    'seed': config['seed'],
    'workdir': workdir,
    'metrics': rows,
    'best': best,
    'best_round': best_round,
    'final': evaluated[-1][0],
    'rounds': rows[-1]['round'],
    'planned_rounds': config['num_rounds'],
  }


def collect(partition: str, folder: str) -> list[dict[str, Any]]:
  """Every run under <folder>/runs/ that has evaluated a round.

  compare.py keeps a run in runs/<algorithm>/seed<k>/, or in
  runs/<algorithm>/<flag>=<value>/seed<k>/ with --sweep; the method label is the algorithm
  followed by the swept setting, if any.
  """
  found = []
  runs_dir = os.path.join(folder, 'runs')
  if not os.path.isdir(runs_dir):
    raise CheckError(f'--runs: {runs_dir} does not exist (run compare.py first)')
  for workdir, _, files in sorted(os.walk(runs_dir)):
    if 'config.json' not in files:
      continue
    run = read_run(workdir, partition)
    if run is not None:
      setting = os.path.relpath(os.path.dirname(workdir), runs_dir).split(os.sep)[1:]
      found.append({**run, 'label': ' '.join([run['algorithm'], *setting])})
  return found


def report(pairs: list[tuple[str, str]]) -> str:
  """The Markdown table of every published number and our runs beside it."""
  lines = [
    '| partition | method | PFLlib (published, %) | ours: best (%) | best at round '
    '| ours: final (%) | rounds run | seeds |',
    '|---|---|---|---|---|---|---|---|',
  ]
  for partition, folder in pairs:
    runs = collect(partition, folder)
    labels = []
    for algorithm in list(PUBLISHED[partition]) + sorted(
      {r['algorithm'] for r in runs} - set(PUBLISHED[partition])
    ):
      labels += sorted({r['label'] for r in runs if r['algorithm'] == algorithm}) or [algorithm]
    for label in labels:
      mine = [r for r in runs if r['label'] == label]
      published = PUBLISHED[partition].get(label.split()[0])
      cells = [partition, label, f'{published:.2f}' if published else 'not reported']
      if mine:
        best = np.array([r['best'] for r in mine]) * 100
        final = np.array([r['final'] for r in mine]) * 100
        spread = (lambda v: f' ± {v.std():.2f}') if len(mine) > 1 else (lambda v: '')
        cells += [
          f'{best.mean():.2f}{spread(best)}',
          ', '.join(str(r['best_round']) for r in mine),
          f'{final.mean():.2f}{spread(final)}',
          ', '.join(f'{r["rounds"]}/{r["planned_rounds"]}' for r in mine),
          ','.join(str(r['seed']) for r in mine),
        ]
      else:
        cells += ['not run', '', '', '', '']
      lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def plot_against_published(partition: str, folder: str, path: str) -> bool:
  """Our METRIC vs round per method, PFLlib's published accuracy dashed."""
  runs = [
    results.Run(
      r['algorithm'],
      r['label'][len(r['algorithm']) :].strip(),
      r['seed'],
      r['workdir'],
      {},
      r['metrics'],
    )
    for r in collect(partition, folder)
  ]
  references = {name: value / 100 for name, value in PUBLISHED[partition].items()}
  return plots.plot_accuracy_vs_round(runs, path, metric=METRIC, references=references)


def write_report(pairs: list[tuple[str, str]], path: str, command: str) -> None:
  """Writes the header, the table and accuracy_vs_round_<partition>.png beside `path`."""
  folder = os.path.dirname(os.path.abspath(path))
  figures = []
  for partition, runs_folder in pairs:
    name = f'accuracy_vs_round_{partition}.png'
    if plot_against_published(partition, runs_folder, os.path.join(folder, name)):
      figures.append(f'![{partition}: weighted accuracy vs round, PFLlib dashed]({name})')
  with open(path, 'w') as f:
    f.write(
      '\n'.join(HEADER + ['', f'- Command: `{command}`', '', report(pairs), '', *figures, ''])
    )


def main(argv: list[str]) -> int:
  del argv  # absl strips the flags; the report quotes sys.argv
  try:
    pairs = parse_runs(flags.FLAGS.runs)
    print(report(pairs))
    if flags.FLAGS.report:
      write_report(pairs, flags.FLAGS.report, shlex.join(['python', *sys.argv]))
  except (CheckError, UserError) as e:
    sys.exit(f'error: {e}')
  return 0
