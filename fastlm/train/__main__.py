"""``python -m fastlm.train`` (what ``torchrun ... -m fastlm.train`` starts on each rank):
the ``fastlm train`` job, its refusals reported as the ``fastlm`` command reports them."""

import sys

from fastlm import errors
from fastlm.train.config import argument_parser

args = argument_parser().parse_args()  # --help and flag errors answer before torch loads
from fastlm.train import run  # noqa: E402

sys.exit(errors.report("fastlm train", lambda: run.main(args)))
