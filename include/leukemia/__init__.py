"""Leukaemia blood-smear classifier pipeline: the library behind the Airflow DAGs.

Importing the package is cheap: tensorflow, mlflow and sklearn are imported inside the functions
that need them.
"""

from leukemia.config import CLASSES

__all__ = ["CLASSES"]
