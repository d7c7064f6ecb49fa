"""kdflow's error types: the leaf module every other may import. Each message names the bad key, value or file.

Permanent errors (a config, data or model that cannot work) derive from ValueError; retrying them never helps.
"""


class ConfigError(ValueError):
    """A configuration that cannot be run; the message names the offending key and value."""


class DataError(ValueError):
    """A data source or set-up that cannot be built; the message names the bad value."""


class ModelError(ValueError):
    """An unknown architecture or bad architecture arguments."""
