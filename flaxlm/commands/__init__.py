"""What each ``flaxlm`` command does once its arguments are parsed (flaxlm/cli.py parses)."""
