"""`python -m skyctl`."""
from skyctl.main import main

main()
