"""``python -m data_prep.phantom`` (its --help prints the package docstring)."""

from data_prep import phantom
from data_prep.phantom.cli import main

__doc__ = phantom.__doc__  # absl's --help: the __main__ module's docstring

main()
