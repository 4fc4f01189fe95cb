"""The one error type for bad configs: raised before anything is built or compiled."""


class ConfigError(ValueError):
  """A config value that cannot work; the message names the field and the fix."""
