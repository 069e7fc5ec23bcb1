"""tga/errors.py

The project's error types. Every error a user can cause (bad record, missing file, contradictory
options) is a `TGAError` subclass whose message names the record, file or option, so that the CLI can
print it cleanly instead of a traceback.
"""


class TGAError(Exception):
    """Base class of errors caused by user input or configuration."""


class ConfigError(TGAError):
    """An option or combination of options is invalid (message names the option)."""


class DataError(TGAError):
    """A data record or file is invalid (message names the record id and/or the file)."""


class TrainingStopped(TGAError):
    """Training stopped on a signal after saving a complete checkpoint (the run did not finish).

    Exits with 143, the status of a process ended by SIGTERM, so a scheduler, a shell `&&` or the demo pipeline does
    not mistake the stop for a finished run.
    """

    exit_code = 143


class TrainingDiverged(TGAError):
    """The loss or the gradients stopped being finite (or the weights did) past `--max_nonfinite_steps`.

    Nothing non-finite is saved or marked complete; the message names the step, the last finite loss and the newest
    complete checkpoint. Exits with 3, so a scheduler does not requeue the run as if it had been preempted.
    """

    exit_code = 3
