"""``python -m playbooks``: the same as the ``playbooks`` command."""

import sys

from playbooks.cli import main

sys.exit(main())
