"""Error types. Every user-facing failure is a SnagError: the CLI prints it on one line and exits 1."""


class SnagError(Exception):
    """Base class: a problem the user can fix (bad input, bad config, missing file)."""


class ConfigError(SnagError):
    """Unknown key, wrong type or out-of-range value in a config."""


class DataError(SnagError):
    """Missing/corrupt input file, wrong shape or dtype, id out of range, empty split."""


class CheckpointError(SnagError):
    """Missing or corrupt checkpoint / run directory."""


class BackendError(SnagError):
    """Distributed backend mis-configuration (bad ds_config, unsupported precision, ...)."""


class TrainingError(SnagError):
    """Training diverged (NaN/inf loss) or could not proceed."""
