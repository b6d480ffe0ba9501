"""``python -m megalite.train`` == ``megalite train``: launchers need a module to run."""
import sys

from megalite.cli import entry

if __name__ == "__main__":
    entry(["train", *sys.argv[1:]])
