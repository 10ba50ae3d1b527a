"""One ``run_<command>`` per CLI command: the command logic that ``nmcli.cli`` calls. Commands
return results and raise nmcli's own errors; they never print, render or exit."""
