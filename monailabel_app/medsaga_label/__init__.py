"""The medsaga MONAI Label app's parts: bundle discovery (``bundles``), automatic and prompted
infer tasks (``infer``, ``prompted``) and few-shot training through the bundle's own train
config (``train``). ``main.py`` wires them into a ``MONAILabelApp``."""
