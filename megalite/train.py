"""``python -m megalite.train`` == ``megalite train``: launchers need a module to run."""
import sys

from megalite.cli import exit_process, train_main

if __name__ == "__main__":
    exit_process(train_main(sys.argv[1:]))
