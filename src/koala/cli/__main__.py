import sys

from . import main

if __name__ == "__main__":  # not when a spawned process (train.teacher_worker) imports it
    sys.exit(main())
