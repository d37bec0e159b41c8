"""One room per command: compile, analyze, evaluate, finetune, energy, export, layers. Each
holds the command's options dataclass (typed values, never command-line strings), its
result (artifacts in memory, `save()` writing what the CLI writes) and `run_<command>`.
options.py holds the option types and inputs they share, results.py the saving.

The commands sit above every stage and below the API (quanos_onnx/__init__.py) and the
CLI (cli.py), which both build the same options and call the same run functions; no
stage imports a command.
"""
