"""Exit codes shared by every entry point."""
EXIT_OK = 0
EXIT_FAILED = 1  # a runtime failure (a step, an actor group)
EXIT_BAD_INPUT = 2  # bad input: one line naming the file, line and field (or config key); nothing written
