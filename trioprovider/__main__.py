import sys

from trioprovider.cli import main

sys.exit(main())
