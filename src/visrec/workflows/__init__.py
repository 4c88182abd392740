"""The application layer: what visrec does with its parts, each written once.

Called by ``visrec.cli``, ``visrec.serving``, the stage scripts (``stages/``) and the Airflow
DAGs (``dags/``); it imports the domain packages below it (data, models, index, inference,
training, evaluation) and never Airflow, DVC or BentoML.

* :mod:`~visrec.workflows.gallery`      build a gallery, change one under its lock, add labelled images
* :mod:`~visrec.workflows.build_index`  the build_index stage: the gallery of the unseen classes + threshold
* :mod:`~visrec.workflows.champion`     the champion store: publish, resolve what is served
* :mod:`~visrec.workflows.promotion`    the promotion rule, the file and MLflow gates, candidate registration
* :mod:`~visrec.workflows.pipeline`     DVC stages from orchestrators: the stage graph, one stage, a reload check
* :mod:`~visrec.workflows.stage_runner` the shell every ``stages/*.py`` script runs in
"""
