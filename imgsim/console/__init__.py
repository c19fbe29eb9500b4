"""Console: where output goes (the user's stderr, Ray's logs in the run) and progress of long steps."""
