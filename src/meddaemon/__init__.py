"""meddaemon: run trained medical image classifiers over a watched folder."""

__version__ = "0.1.0"
#: the Manufacturer of every DICOM object meddaemon writes, by which it knows them when they come back
MANUFACTURER = "meddaemon"
