"""``python -m engine.worker --app NAME --entry PATH --fd N``: one slave process."""
import sys

from engine.worker.runtime import main

sys.exit(main())
