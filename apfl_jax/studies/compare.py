"""Compares algorithms over seeds on identical partitions, with tables and plots.

  python experiments/compare.py --flagfile=fashion_mnist_dropout.flags \
      --algorithms=fedavg,local,fedgen,apfl --seeds=0,1,2 --out=docs/results/dropout
  python experiments/compare.py --flagfile=fashion_mnist_dropout.flags --algorithms=apfl \
      --seeds=0,1,2 --sweep=apfl_beta:0.001,0.01,0.1,0.5,1.0 --out=docs/results/beta

Every (algorithm, seed[, swept value]) runs in this process with
`train.train_and_evaluate` in its own workdir <out>/runs/<algorithm>[/<flag>=<value>]/
seed<k>, so rerunning an interrupted comparison resumes each run (a finished run is only
re-read). The partition depends on the seed and the partition flags only, so every
method sees the same split for the same seed. All flags of experiments/main.py are
accepted (--algorithm, --seed and --workdir are set per run); a bare flagfile name is
looked up in experiments/.

Writes to <out>: results.md and results.csv (per method mean ± std over seeds of the
final and best-over-rounds accuracies), accuracy_vs_round.png, per_client_accuracy.png
(when metrics.jsonl has 'client_personalized_acc') and, for AP-FL with
--generator=image, generated_samples[_<flag>=<value>].png from the first finished seed's
last checkpoint. A run that fails with a UserError (bad flag, missing data, divergence)
is a 'failed' entry with its message in the table; the others go on. When every run
fails, the comparison ends with an error (exit status 1) once the table is written.
Every flag of the comparison, and that --out can be written, is checked before any run.
"""

import dataclasses
import datetime
import json
import os
import platform
import shlex
from typing import Any, cast

from absl import flags, logging
import jax
import jax.numpy as jnp
import numpy as np

from apfl_jax.algorithms.generative import generator as generator_lib
from apfl_jax.config import config as config_lib
from apfl_jax.core.errors import ConfigError, UserError
from apfl_jax.runner import batch, checkpoints, run_folder, train
from apfl_jax.studies import outputs, plots, results

# Flags the comparison sets for each run itself.
PER_RUN_FLAGS = ('algorithm', 'seed', 'workdir')
SAMPLES_PER_CLASS = 8


def define_flags() -> None:
  """Defines main.py's flags and the comparison's own (once per process)."""
  config_lib.define_flags()
  if 'algorithms' in flags.FLAGS:
    return
  flags.DEFINE_list('algorithms', 'fedavg,local,fedgen,apfl', 'Algorithms to compare.')
  flags.DEFINE_list('seeds', '0,1,2', 'Seeds; each one is a partition and an initialisation.')
  flags.DEFINE_string('out', '', 'Output folder of the comparison (required).')
  flags.DEFINE_string(
    'sweep',
    '',
    'FLAG:v1,v2,... runs every value of one flag as its own method row, e.g. apfl_beta:0.01,0.1.',
  )
  flags.DEFINE_bool(
    'experiment_axis',
    True,
    'Train the seeds of one algorithm (and the values of a --sweep of a flag in '
    'runner.batch.AXIS_FLAGS) as ONE jitted program, each still its own run folder; '
    '--noexperiment_axis runs one program per run.',
  )
  flags.DEFINE_list(
    'algorithm_flags',
    [],
    'ALGORITHM.FLAG=VALUE,...: flags set for the runs of one algorithm only (its row is labelled '
    'with them), e.g. fedgen.fedgen_alpha=2,fedgen.fedgen_beta=2.',
  )


def parse_sweep(spec: str) -> tuple[str, list[tuple[str, Any]]]:
  """Parses --sweep.

  Args:
    spec: 'FLAG:v1,v2,...' or ''.

  Returns:
    (flag name, [(value as written, parsed value)]); ('', [('', None)]) without a sweep.

  Raises:
    ConfigError: a malformed spec, a flag that is not a Config field (or is set per run)
      or a value the flag cannot parse.
  """
  if not spec:
    return '', [('', None)]
  name, _, values = spec.partition(':')
  fields = {f.name for f in dataclasses.fields(config_lib.Config)}
  texts = [v.strip() for v in values.split(',') if v.strip()]
  if name not in fields or name in PER_RUN_FLAGS or not texts:
    raise ConfigError(
      f'--sweep must be FLAG:v1,v2,... with FLAG a flag of main.py other '
      f'than {", ".join(PER_RUN_FLAGS)}; got {spec!r}'
    )
  repeated = sorted({t for t in texts if texts.count(t) > 1})
  if repeated:
    raise ConfigError(f'--sweep names {name}={", ".join(repeated)} more than once')
  parser = flags.FLAGS[name].parser
  parsed = []
  for text in texts:
    try:
      parsed.append((text, parser.parse(text)))
    except ValueError as e:
      raise ConfigError(f'--sweep: bad value {text!r} for --{name}: {e}') from None
  return name, parsed


def parse_algorithm_flags(
  specs: list[str], algorithms: list[str]
) -> dict[str, tuple[str, dict[str, Any]]]:
  """Parses --algorithm_flags.

  Args:
    specs: 'ALGORITHM.FLAG=VALUE' items.
    algorithms: the compared algorithms (--algorithms).

  Returns:
    {algorithm: (setting label 'FLAG=VALUE,...', {flag: parsed value})}.

  Raises:
    ConfigError: a malformed item, an algorithm not compared, a flag that is not a Config
      field (or is set per run) or a value the flag cannot parse.
  """
  fields = {f.name for f in dataclasses.fields(config_lib.Config)}
  texts: dict[str, list[str]] = {}
  changes: dict[str, dict[str, Any]] = {}
  for spec in specs:
    target, _, text = spec.strip().partition('=')
    algorithm, _, name = target.partition('.')
    if not text or algorithm not in algorithms or name not in fields or name in PER_RUN_FLAGS:
      raise ConfigError(
        '--algorithm_flags items must be ALGORITHM.FLAG=VALUE with ALGORITHM one of '
        f'--algorithms and FLAG a flag of main.py other than {", ".join(PER_RUN_FLAGS)}; '
        f'got {spec!r}'
      )
    try:
      changes.setdefault(algorithm, {})[name] = flags.FLAGS[name].parser.parse(text)
    except ValueError as e:
      raise ConfigError(f'--algorithm_flags: bad value {text!r} for --{name}: {e}') from None
    texts.setdefault(algorithm, []).append(f'{name}={text}')
  return {a: (','.join(texts[a]), changes[a]) for a in changes}


def parse_seeds(seeds: list[str]) -> list[int]:
  try:
    parsed = [int(s) for s in seeds]
  except ValueError:
    raise ConfigError(f'--seeds must be integers like 0,1,2; got {",".join(seeds)!r}') from None
  if not parsed:
    raise ConfigError('--seeds is empty')
  repeated = sorted({s for s in parsed if parsed.count(s) > 1})
  if repeated:
    raise ConfigError(f'--seeds names {", ".join(map(str, repeated))} more than once')
  return parsed


def run_workdir(out: str, algorithm: str, setting: str, seed: int) -> str:
  parts = [out, 'runs', algorithm] + (
    [setting.replace(os.sep, '_').replace(' ', '_')] if setting else []
  )
  return os.path.join(*parts, f'seed{seed}')


def run_one(config: config_lib.Config, setting: str, workdir: str) -> results.Run:
  """Validates, then trains (or resumes, or re-reads) one run; a UserError makes a failed Run."""
  try:
    config = config.validate()
    summary = train.train_and_evaluate(config, workdir)
  except UserError as e:
    return results.Run(
      config.algorithm,
      setting,
      config.seed,
      workdir,
      {},
      [],
      error=str(e).splitlines()[0] if str(e) else type(e).__name__,
    )
  with open(os.path.join(workdir, 'partition.json')) as f:
    monopoly = tuple(json.load(f)['monopoly_clients'])
  return results.Run(
    config.algorithm,
    setting,
    config.seed,
    workdir,
    summary,
    run_folder.read_metrics(workdir),
    dropout_clients=config.dropout_client_ids(monopoly),
  )


def _report(i: int, total: int, run: results.Run) -> None:
  status = (
    f'FAILED: {run.error}'
    if run.failed
    else f'final personalized accuracy {run.summary.get("final_personalized_acc")}'
  )
  print(f'[{i}/{total}] {run.label} seed {run.seed}: {status}', flush=True)


def finished_run(config: config_lib.Config, setting: str, summary: dict[str, Any]) -> results.Run:
  """The `results.Run` of a run that finished in `config.workdir`."""
  with open(os.path.join(config.workdir, 'partition.json')) as f:
    monopoly = tuple(json.load(f)['monopoly_clients'])
  return results.Run(
    config.algorithm,
    setting,
    config.seed,
    config.workdir,
    summary,
    run_folder.read_metrics(config.workdir),
    dropout_clients=config.dropout_client_ids(monopoly),
  )


def failed_run(config: config_lib.Config, setting: str, error: BaseException) -> results.Run:
  message = str(error).splitlines()[0] if str(error) else type(error).__name__
  return results.Run(config.algorithm, setting, config.seed, config.workdir, {}, [], error=message)


def run_all(
  planned: list[tuple[str, str, int, config_lib.Config]], sweep_flag: str, experiment_axis: bool
) -> dict[str, results.Run]:
  """Runs every planned (algorithm, setting, seed, config); returns the Runs by workdir.

  With `experiment_axis`, the seeds of one algorithm and setting (and the values of a
  swept `batch.AXIS_FLAGS` flag) train as one program (`batch.train_and_evaluate_batch`);
  a group that cannot share one program says why in one line and runs one program per run.
  """
  groups: dict[tuple[str, str], list[tuple[str, int, config_lib.Config]]] = {}
  for algorithm, setting, seed, config in planned:
    shared = setting
    if sweep_flag in batch.AXIS_FLAGS:  # the swept values join the seeds' program
      shared = ' '.join(s for s in setting.split(' ') if not s.startswith(f'{sweep_flag}='))
    groups.setdefault((algorithm, shared), []).append((setting, seed, config))
  finished: dict[str, results.Run] = {}
  total = len(planned)

  def one_by_one(members):
    for setting, seed, config in members:
      print(
        f'[{len(finished) + 1}/{total}] {config.algorithm} {setting} seed {seed} -> '
        f'{config.workdir}',
        flush=True,
      )
      run = run_one(config, setting, config.workdir)
      finished[config.workdir] = run
      _report(len(finished), total, run)

  for (algorithm, _), members in groups.items():
    if not experiment_axis or len(members) == 1:
      one_by_one(members)
      continue
    try:
      configs = [c.validate() for _, _, c in members]
      batch.check_batchable(configs)
    except batch.NotBatchable as e:
      print(f'{algorithm}: one program per run ({e})', flush=True)
      one_by_one(members)
      continue
    except UserError as e:
      for setting, _, config in members:
        finished[config.workdir] = failed_run(config, setting, e)
        _report(len(finished), total, finished[config.workdir])
      continue
    print(
      f'[{len(finished) + 1}-{len(finished) + len(members)}/{total}] {algorithm}: '
      f'{len(members)} runs in one program -> {os.path.dirname(configs[0].workdir)}',
      flush=True,
    )
    try:
      summaries = batch.train_and_evaluate_batch(configs, [c.workdir for c in configs])
    except batch.NotBatchable as e:
      print(f'{algorithm}: one program per run ({e})', flush=True)
      one_by_one(members)
      continue
    except UserError as e:
      summaries = [e] * len(members)
    for (setting, _, config), summary in zip(members, summaries):
      run = (
        failed_run(config, setting, summary)
        if isinstance(summary, BaseException)
        else finished_run(config, setting, summary)
      )
      finished[config.workdir] = run
      _report(len(finished), total, run)
  return finished


def generated_pixels(workdir: str) -> tuple[np.ndarray, Any]:
  """Samples the image generator of an AP-FL run's last checkpoint.

  Args:
    workdir: the run's folder (--algorithm=apfl, --generator=image).

  Returns:
    (pixels float [num_classes, SAMPLES_PER_CLASS, H, W, C] in [0, 1], the experiment).
  """
  exp, state, _ = checkpoints.restore_latest(workdir)
  config = exp.config
  setup, server = cast(Any, exp.algorithm).setup, state.server
  num_classes = exp.dataset.num_classes
  labels = np.repeat(np.arange(num_classes), SAMPLES_PER_CLASS)
  # BatchNorm statistics come from a reference batch of the memorized labels, as when the
  # friend models train, so classes the generator never saw are sampled zero-shot.
  reference = np.resize(np.flatnonzero(np.asarray(server.seen_counts) > 0), setup.batch_size)
  images = generator_lib.generate(
    setup.generator,
    server.generator.params,
    jax.random.key(config.seed),
    jnp.asarray(labels),
    setup.noise_dim,
    setup.noise_distribution,
    reference_labels=jnp.asarray(reference),
  )
  mean = np.asarray(exp.dataset.mean, np.float32)
  std = np.asarray(exp.dataset.std, np.float32)
  pixels = np.clip(np.asarray(images) * std + mean, 0.0, 1.0)
  return pixels.reshape(num_classes, SAMPLES_PER_CLASS, *pixels.shape[1:]), exp


def write_generated_samples(
  runs: list[results.Run], configs: dict[str, config_lib.Config], out: str
) -> list[tuple[str, str]]:
  """generated_samples[_<setting>].png per AP-FL image-generator method.

  Args:
    runs: all runs.
    configs: each run's config by workdir.
    out: the output folder.

  Returns:
    (caption, file name) of each figure written.
  """
  figures = []
  for label, group in results.group_by_label(runs).items():
    finished = [r for r in group if not r.failed]
    if group[0].algorithm != 'apfl' or not finished:
      continue
    config = configs[finished[0].workdir]
    if config.generator != 'image':
      print(
        f'{label}: no generated_samples.png (--generator={config.generator} makes '
        'features, not images)'
      )
      continue
    pixels, exp = generated_pixels(finished[0].workdir)
    name = f'generated_samples{"_" + finished[0].setting if finished[0].setting else ""}.png'
    unseen = [exp.dataset.class_names[c] for c in exp.unseen_classes]
    plots.plot_generated_samples(
      pixels,
      exp.dataset.class_names,
      exp.unseen_classes,
      f'{label}, seed {finished[0].seed}, round {config.num_rounds}; '
      f'unseen (red): {", ".join(unseen) or "none"}',
      os.path.join(out, name),
    )
    figures.append((f'generated samples of {label} (seed {finished[0].seed})', name))
  return figures


def machine_description() -> str:
  device = jax.devices()[0]
  return (
    f'{platform.platform()}, {os.cpu_count()} CPUs, jax {jax.__version__} on '
    f'{len(jax.devices())} x {device.platform} ({device.device_kind})'
  )


def non_default_flags(config: config_lib.Config) -> str:
  defaults = config_lib.Config()
  return ' '.join(
    f'--{k}={v}'
    for k, v in dataclasses.asdict(config).items()
    if k not in PER_RUN_FLAGS and v != getattr(defaults, k)
  )


def main(argv: list[str]) -> int:
  """Parses `argv` (program name first), runs every run, writes tables and plots.

  Returns:
    0; failed runs are reported in the results, not by the exit status (unless every
    run failed).

  Raises:
    UserError: an invalid flag of the comparison as a whole (checked before any run), an
      --out that cannot be written, or every run failed (after the results are written).
    flags.Error: an unknown flag or a malformed flag value.
  """
  define_flags()
  command = shlex.join(['python', *argv])
  flags.FLAGS.unparse_flags()
  extra = flags.FLAGS(config_lib.resolve_flagfile_args(argv))[1:]
  if extra:
    raise ConfigError(
      f'unexpected argument {extra[0]!r}: flags are written --name=value, on the command '
      'line and in a --flagfile'
    )
  logging.set_verbosity(logging.WARNING)  # keeps orbax's per-save INFO lines out
  base = config_lib.from_flags(flags.FLAGS)
  # The flags as given: each run fills in its own algorithm's defaults (--generator, ...).
  given = config_lib.from_flags(flags.FLAGS, validate=False)
  out = flags.FLAGS.out
  if not out:
    raise ConfigError('--out is required: the folder of the runs, tables and plots')
  algorithms = flags.FLAGS.algorithms
  if not algorithms:
    raise ConfigError('--algorithms is empty: name the algorithms to compare, e.g. fedavg,apfl')
  repeated = sorted({a for a in algorithms if algorithms.count(a) > 1})
  if repeated:
    raise ConfigError(f'--algorithms names {", ".join(repeated)} more than once')
  for algorithm in algorithms:
    if algorithm not in config_lib.ALGORITHMS:
      raise ConfigError(
        f'--algorithms: unknown algorithm {algorithm!r}; choose from '
        f'{", ".join(config_lib.ALGORITHMS)}'
      )
  seeds = parse_seeds(flags.FLAGS.seeds)
  sweep_flag, sweep_values = parse_sweep(flags.FLAGS.sweep)
  algorithm_flags = parse_algorithm_flags(flags.FLAGS.algorithm_flags, algorithms)
  outputs.check_output_folder(out, 'out')
  os.makedirs(out, exist_ok=True)

  jobs = [
    (seed, algorithm, text, value)
    for seed in seeds
    for algorithm in algorithms
    for text, value in sweep_values
  ]
  planned = []  # (algorithm, setting, seed, config) in the order of the table
  for seed, algorithm, text, value in jobs:
    own_setting, changes = algorithm_flags.get(algorithm, ('', {}))
    changes = {**changes, **({sweep_flag: value} if sweep_flag else {})}
    setting = ' '.join(s for s in (own_setting, f'{sweep_flag}={text}' if sweep_flag else '') if s)
    workdir = run_workdir(out, algorithm, setting, seed)
    config = given.replace(algorithm=algorithm, seed=seed, workdir=workdir, **changes)
    planned.append((algorithm, setting, seed, config))
  configs = {c.workdir: c.with_algorithm_defaults() for _, _, _, c in planned}
  finished = run_all(planned, sweep_flag, flags.FLAGS.experiment_axis)
  runs = [finished[c.workdir] for _, _, _, c in planned]
  figures = []
  if plots.plot_accuracy_vs_round(runs, os.path.join(out, 'accuracy_vs_round.png')):
    figures.append(('personalized accuracy vs round', 'accuracy_vs_round.png'))
  if plots.plot_per_client_accuracy(runs, os.path.join(out, 'per_client_accuracy.png')):
    figures.append(('final personalized accuracy per client', 'per_client_accuracy.png'))
  else:
    print('no per_client_accuracy.png: metrics.jsonl has no client_personalized_acc')
  figures += write_generated_samples(runs, configs, out)

  rounds = (
    f'{sweep_flag} swept'
    if sweep_flag == 'num_rounds'
    else f'{base.num_rounds} (evaluated every {base.eval_every})'
  )
  header = [
    f'# Comparison: {", ".join(algorithms)}'
    + (f', {sweep_flag} in {{{", ".join(t for t, _ in sweep_values)}}}' if sweep_flag else ''),
    '',
    f'- Command: `{command}`',
    f'- Flags (non-default): `{non_default_flags(given)}`',
    f'- Seeds: {", ".join(str(s) for s in seeds)} (same seed = same partition for every method)',
    f'- Rounds: {rounds}',
    f'- Machine: {machine_description()}',
    f'- Written: {datetime.datetime.now().isoformat(timespec="seconds")}; runs in '
    f'`{os.path.join(out, "runs")}`',
    '- Cells: mean ± std over the finished seeds (population std, ddof=0) of the final '
    'accuracy and of the best accuracy over evaluated rounds; n/a: the method does not '
    'report it.',
  ]
  table = results.method_table(runs)
  results.write_markdown(table, header, figures, os.path.join(out, 'results.md'))
  results.write_csv(table, os.path.join(out, 'results.csv'))
  failed = sum(r.failed for r in runs)
  print(results.markdown_table(table))
  print(
    f'{len(runs) - failed} of {len(runs)} runs finished; results in '
    f'{os.path.join(out, "results.md")}'
  )
  if failed == len(runs):
    first = next(r for r in runs if r.failed)
    raise UserError(
      f'every run failed ({len(runs)} of {len(runs)}; the first: {first.error}); see '
      f'{os.path.join(out, "results.md")}'
    )
  return 0
