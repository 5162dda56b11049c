"""In-process simulation runtime: executors and the round loop."""
