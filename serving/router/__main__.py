"""python -m serving.router --port N --state-file PATH: the router as a process."""

from serving.router.serve import main

main()
