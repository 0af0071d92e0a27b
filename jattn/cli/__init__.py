"""The `jattn` command: one module per subcommand, each parsing its arguments and calling the
library. Nothing in the library imports this package."""
