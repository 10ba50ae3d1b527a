"""``python -m nmcli``: the same entry point as the ``nmcli`` console script."""

from nmcli.cli.app import main

if __name__ == "__main__":
    main()
