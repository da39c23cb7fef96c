"""The run pipeline: lock, temporary folder, journal and resume, fsync, verify, publish."""
