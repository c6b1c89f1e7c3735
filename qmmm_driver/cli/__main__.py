import sys

from . import main

if __name__ == "__main__":  # not when a spawned child process imports this module as its main
    sys.exit(main())
