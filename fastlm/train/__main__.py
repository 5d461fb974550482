"""``python -m fastlm.train`` (what ``torchrun ... -m fastlm.train`` starts on each rank):
the ``fastlm train`` command."""

import sys

from fastlm.cli import train

sys.exit(train(sys.argv[1:]))
