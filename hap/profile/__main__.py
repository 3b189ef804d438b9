"""``python -m hap.profile``: the ``hap-profile`` command (also what torchrun runs)."""
import sys

from hap.profile.launch import main

sys.exit(main())
