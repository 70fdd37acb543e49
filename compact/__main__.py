import sys

from compact.cli import main

sys.exit(main())
