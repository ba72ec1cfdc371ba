"""The six architectures of the study and how their weights are initialised."""
