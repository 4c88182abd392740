"""Entry points that run other systems' servers on this machine, without importing them.

* :mod:`~visrec.orchestration.supervisor`   start commands in one process group, stop every process they left
* :mod:`~visrec.orchestration.airflow_local` Airflow's components on 127.0.0.1 (``make airflow``)
"""
