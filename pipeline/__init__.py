"""spikedistill pipeline: recipes, stages, losses, the trainer and the `spikedistill` CLI."""

from pipeline.errors import ConfigError, PipelineError, StageError

__all__ = ["ConfigError", "PipelineError", "StageError"]
