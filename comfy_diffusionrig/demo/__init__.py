"""The offline demo: synthetic FLAME-format world and stand-in files, the demo run and its report, plots and metrics."""
