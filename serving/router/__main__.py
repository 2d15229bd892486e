"""python -m serving.router --port N --state-file PATH: the router as a process."""

from serving.router.app import main

main()
