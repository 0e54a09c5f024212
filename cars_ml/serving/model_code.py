"""Models-from-code entry for MLflow: the file ``mlflow.pyfunc.log_model`` records and runs.

MLflow executes this file when the model is loaded (after putting the logged ``cars_ml`` copy
on ``sys.path``) instead of unpickling an object, so nothing user-supplied is unpickled.
"""

from mlflow.models import set_model

from cars_ml.serving.model import CarsClassifier

set_model(CarsClassifier())
