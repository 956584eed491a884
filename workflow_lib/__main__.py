import sys

from workflow_lib.cli import main

sys.exit(main())
