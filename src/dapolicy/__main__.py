import sys

from dapolicy.cli import main

sys.exit(main())
