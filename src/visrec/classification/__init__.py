"""Image classification with the shared pieces: registry backbone + FC head, the training
engine, the export code and the one Predictor class (``visrec classify ...``).

Modules: ``data`` (sources, split, class map, dataset), ``model`` (Classifier), ``mixing``
(mixup / cutmix), ``train`` (the engine task and ``run_training``), ``evaluate`` (top-1/5,
per-class accuracy, confusion matrix), ``predict`` (top-k from a checkpoint or an export).
"""
