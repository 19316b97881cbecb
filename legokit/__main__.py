import sys

from legokit.cli import main

sys.exit(main())
