"""Framework callbacks, each importing its framework only when imported itself:

- ``wavg_ext.integrations.lightning.WeightAveraging``: a Lightning ``Callback``;
- ``wavg_ext.integrations.transformers.WeightAveragingCallback``: a Hugging Face
  ``TrainerCallback``.
"""
