import sys

from distthink.cli import main

sys.exit(main())
