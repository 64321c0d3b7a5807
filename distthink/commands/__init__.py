"""The `distthink` subcommands: thin argparse shells over the library.

Each handler imports what it runs inside itself, on purpose: `distthink --help` takes 0.1 s, and a subcommand
loads only its own dependencies (torch and transformers alone take seconds to import). This is the one place
in the package where imports are function-level by rule; elsewhere a lazy import says why on its line.
"""
