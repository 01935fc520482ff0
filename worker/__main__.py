import sys

from worker.launcher import main

sys.exit(main())
