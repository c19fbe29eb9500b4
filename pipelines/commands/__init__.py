"""The `imgsim` commands, one module each: its flags (`arguments`), what it runs and prints (`run`),
and its `COMMAND`, which `imgsim/cli.py` lists and `python -m pipelines.X` runs on its own.
`imgsim serve`'s lives in `serve/launch.py`."""
