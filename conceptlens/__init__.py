"""conceptlens: the application — CLI, pipeline, reports and the demo."""

__version__ = "0.1.0"
