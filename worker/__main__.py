import sys

from worker.cli import main

main(["run", *sys.argv[1:]])
