import sys

from jaxbrats.cli import main

sys.exit(main())
