"""One attempt of one run, as a process: no database, no HTTP, only events."""
