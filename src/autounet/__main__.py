import sys

from autounet.cli import main

sys.exit(main())
