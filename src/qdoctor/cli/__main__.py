import sys

from qdoctor.cli import main

sys.exit(main())
