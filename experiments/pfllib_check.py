"""Puts our accuracies beside PFLlib's published Fashion-MNIST table.

Command lines and what is written: `apfl_jax.studies.pfllib_check` (its docstring).
"""

from absl import app

from apfl_jax.studies import pfllib_check

if __name__ == '__main__':
  pfllib_check.define_flags()
  app.run(pfllib_check.main)
