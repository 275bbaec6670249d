import sys

from sslkit.cli import main

sys.exit(main())
