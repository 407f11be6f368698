"""The ``flaxlm`` commands, one module per command (or command group): each holds
``add_parser(subparsers)``, which declares the command's arguments, right beside the handler it
dispatches to. flaxlm/cli.py lists the modules, parses and runs the chosen handler. Handlers
import the library inside their body, so ``flaxlm --help`` starts without jax."""
