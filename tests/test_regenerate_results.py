"""Argument checks of experiments/regenerate_results.sh (its sections run for hours on CPU)."""

import os
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, 'experiments', 'regenerate_results.sh')


def regenerate(*sections):
  return subprocess.run(['bash', SCRIPT, *sections], capture_output=True, text=True)


def test_no_section_prints_the_usage():
  proc = regenerate()
  assert proc.returncode == 2
  assert proc.stderr.startswith('usage: bash experiments/regenerate_results.sh SECTION...')


def test_an_unknown_section_is_refused_before_anything_runs():
  proc = regenerate('async', 'dirichlet50')
  assert proc.returncode == 2 and proc.stdout == ''
  assert proc.stderr.strip() == (
    "error: unknown section 'dirichlet50' (dirichlet, dropout, async, apfl_async, pfllib)"
  )
