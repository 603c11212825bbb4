"""Errors that reach the user as one line (the runner prints them without a traceback)."""


class UserError(Exception):
  """Bad input or a missing resource: the message is the whole explanation."""


class ConfigError(UserError):
  """An invalid flag value; the message names the flag."""


class DataUnavailableError(UserError):
  """A data set (or model asset) is not on this machine; the message says how to get it."""


class TrainingDivergedError(UserError):
  """NaN or Inf appeared in training; the message names the round and the client."""


class RunInterrupted(KeyboardInterrupt):
  """Ctrl-C or SIGTERM ended a run; the message says the round reached and how to resume.

  A KeyboardInterrupt, so code that stops on Ctrl-C still stops on it.
  """
