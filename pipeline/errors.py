"""Exception types of the pipeline layer.

Every message is one line naming the file or dotted recipe key and how to fix it; the CLI prints it and
exits 2 (the traceback only with --debug).
"""


class PipelineError(Exception):
    """Base class of every error the pipeline raises on purpose."""


class ConfigError(PipelineError):
    """A recipe, an override or a run directory's config is wrong (names the dotted key or the file)."""


class StageError(PipelineError):
    """A stage cannot run or failed in a way the user can act on (names the stage and the fix)."""
