"""``python -m fastlm.train`` (what ``torchrun ... -m fastlm.train`` starts on each rank):
the ``fastlm train`` job, its refusals reported as the ``fastlm`` command reports them."""

import sys

from fastlm import errors
from fastlm.train import run

sys.exit(errors.report("fastlm train", lambda: run.main(sys.argv[1:])))
