"""Accuracy against virtual time for sync and async runs, and the staleness histogram.

Command lines and what is written: `apfl_jax.studies.async_curves` (its docstring).
"""

from absl import app

from apfl_jax.studies import async_curves

if __name__ == '__main__':
  async_curves.define_flags()
  app.run(async_curves.main)
