"""Accuracy against virtual time for sync and async runs, and the staleness histogram.

  python experiments/plot_async.py \
      --runs=docs/results/async/runs/sync,docs/results/async/runs/fedbuff \
      --out=docs/results/async --target=0.6 --metric=active_personalized_acc

Each --runs item is one run's workdir or a folder of seed runs (its subfolders that hold a
metrics.jsonl, e.g. seed0, seed1, seed2); a folder is one row of the table and one colour of
the figure. Reads each run's metrics.jsonl (which logs every applied update's staleness in
async mode; only at evaluated steps, so the histogram covers those steps' buffers), writes
accuracy_vs_virtual_time.png, staleness_histogram.png and summary.md: per row, mean ± std
over its seeds of the final virtual time, of the accuracy at the budget (the shortest final
virtual time among the runs of the same seed; every folder needs the same seeds) and of the
virtual time to --target accuracy (over the seeds that reach it).
"""

from absl import app

from apfl_jax.studies import async_curves

if __name__ == '__main__':
  async_curves.define_flags()
  app.run(async_curves.main)
