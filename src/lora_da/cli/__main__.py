"""`python -m lora_da.cli`."""

import sys

from lora_da.cli.main import main

sys.exit(main())
