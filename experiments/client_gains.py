"""Where one method gains over another: per-client accuracy gain, small vs large clients.

Command lines and what is written: `apfl_jax.studies.client_gains` (its docstring).
"""

from absl import app

from apfl_jax.studies import client_gains

if __name__ == '__main__':
  client_gains.define_flags()
  app.run(client_gains.main)
