"""The web console (``meddaemon web``): server-rendered pages over the daemon's database (docs/design.md section 15)."""
