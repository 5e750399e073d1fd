"""`pspnet`: the command line, above every other package of the project.

  cli      the root parser and main(): one subcommand per job, heavy imports per subcommand
  worker   `pspnet worker`: one stage process on this host for a daemon elsewhere
  demo     `pspnet demo`: build_model and the daemon end to end, on the embedded default

Layers (contracts in pyproject.toml, checked by lint-imports in ./scripts/test):
pspnet > bench > daemon | build_model (neither imports the other) > stages.
"""
