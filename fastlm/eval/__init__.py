"""Evaluation of fastlm models.

- ``metrics``: task metrics on plain Python values (accuracy, exact match,
  precision/recall/F1, Matthews correlation, Pearson and Spearman correlation, BLEU and
  chrF through ``sacrebleu``, ROUGE through ``rouge-score``, demographic parity
  difference).
- ``perplexity``: sliding-window perplexity of causal models and pseudo-perplexity of
  masked models on held-out text.
- ``bias``: CrowS-Pairs paired-sentence likelihood comparison; demographic parity of a
  classifier's predictions read from a file.
- ``interpret``: attention maps of any layer and head, saved as heatmaps; per-token losses.
- ``scoring``: continuation log-likelihoods, rolling log-likelihoods and generation, as the
  task evaluations ask of a model.
- ``tasks``, ``cli``: n-shot evaluation on local JSONL tasks (MMLU, WinoGrande, BIG-Bench
  Hard formats) and ``fastlm eval``.
- ``lm_eval_adapter``: fastlm checkpoints as an lm-evaluation-harness model type (imported
  only on demand: fastlm does not need lm-eval).

BLEU, chrF, ROUGE and the heatmaps need the ``fastlm[eval]`` extra (sacrebleu, rouge-score,
matplotlib), imported only when called, so fastlm imports without it.
"""
