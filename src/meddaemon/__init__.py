"""meddaemon: run trained medical image classifiers over a watched folder."""

__version__ = "0.1.0"
