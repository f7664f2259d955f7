"""One child process: its argv, its state machine, health checks, the slot cache saved
across stops, and the process's open-file limit."""
