"""Errors kdlm reports to the user as one clear message (the CLI prints them without a traceback)."""


class KdlmError(Exception):
    """Base class: bad input or state that the user can fix; the message says what and where."""


class DataError(KdlmError):
    """A data file or dataset is malformed: the message names the file, line and field."""


class ModelError(KdlmError):
    """A model or tokenizer cannot be used as asked (e.g. teacher and student tokenizers differ)."""


class CheckpointError(KdlmError):
    """A checkpoint is missing, incomplete, or does not match the run."""


class TrainingError(KdlmError):
    """Training cannot go on (e.g. non-finite losses or gradients several steps in a row)."""


class CacheError(KdlmError):
    """A teacher cache is missing, unfinished, torn, or was built for another run (teacher, tokenizer, lengths...)."""


class RunDirError(KdlmError):
    """``train.output_dir`` already holds a run that a new run would replace (or cannot be moved aside)."""
