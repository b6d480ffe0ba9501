"""``python -m megalite.launcher`` == ``megalite launch`` (what pdsh/ssh run on each node)."""
import sys

from megalite.launcher.main import main

sys.exit(main())
